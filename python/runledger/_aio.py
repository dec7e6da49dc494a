"""Makes the native methods proper ``async def`` coroutine functions.

The extension's methods return asyncio futures (awaitable, but not
coroutines: ``asyncio.create_task`` and ``inspect.iscoroutinefunction``
refuse them). Each public class here holds its native object and gets, for
every awaitable method of it, a one-line ``async def`` that awaits the native
call. Signatures and docs are the native ones; no logic lives here.
"""

import inspect


def delegate(cls, native_cls, coroutines, plain=()):
    """Gives ``cls`` (whose instances hold ``_native``) the methods of
    ``native_cls``: ``coroutines`` as ``async def``, ``plain`` as they are."""
    for name in coroutines:
        setattr(cls, name, _coroutine(cls, native_cls, name))
    for name in plain:
        setattr(cls, name, _plain(cls, native_cls, name))
    return cls


def _coroutine(cls, native_cls, name):
    method = getattr(native_cls, name)

    async def call(self, *args, **kwargs):
        return await method(self._native, *args, **kwargs)

    return _named(call, cls, name, method)


def _plain(cls, native_cls, name):
    method = getattr(native_cls, name)

    def call(self, *args, **kwargs):
        return method(self._native, *args, **kwargs)

    return _named(call, cls, name, method)


def _named(call, cls, name, method):
    call.__name__ = name
    call.__qualname__ = f"{cls.__name__}.{name}"
    call.__doc__ = method.__doc__
    try:
        call.__signature__ = inspect.signature(method)
    except (TypeError, ValueError):
        pass
    return call
