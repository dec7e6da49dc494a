//! The Lua of `lua/`, one source with two ways in.
//!
//! - **Functions** (Redis 7+): every operation is a function of ONE library,
//!   [`Library`], loaded once per server with `FUNCTION LOAD` and called with
//!   `FCALL`. The library and its functions are named with a hash of its code
//!   (`runledger_<hash>`, `rl<hash>_<operation>`), so two builds, or two
//!   tenants on different builds, never replace each other's code. The
//!   includes are defined once, when the library loads, not at every call.
//! - **Scripts** (`EVALSHA`), the fallback where `FUNCTION` or `FCALL` is
//!   refused (an ACL without them, a server before 7.0): each script is its
//!   operation's file with the includes it uses prepended:
//!   `lua/include/common.lua` (errors, checks, clock, fencing) for all, and
//!   `lua/include/queue.lua` (lanes, finishing, requeueing, lease recovery)
//!   for those that move runs. The claim lives whole in
//!   `lua/claim_next_run.lua`; `finalize_run`, which can chain a claim after
//!   its finish, gets that file's definitions too (all but its last line).
//!
//! An operation's file is the body of its function in the library: it reads
//! `KEYS` and `ARGV`, which the library declares as locals that each call
//! binds (see [`Library`]), and its top-level `return` is the function's.
//! [`Lua::code`] is the script form, which pipelines load by hand
//! (`SCRIPT LOAD`) on NOSCRIPT.

use std::sync::LazyLock;

use redis::Script;

/// One operation: its function's name in the library, and its script form.
pub struct Lua {
    pub script: Script,
    pub code: &'static str,
    /// The name `FCALL` calls it by.
    pub function: String,
    /// False for operations that only read: the write concern skips them,
    /// and their functions carry the `no-writes` flag (callable by `FCALL_RO`).
    pub writes: bool,
}

impl Lua {
    fn new(name: &'static str, code: &'static str, library: &Library) -> Self {
        Lua { script: Script::new(code), code, function: library.function(name), writes: true }
    }

    fn read_only(mut self) -> Self {
        self.writes = false;
        self
    }
}

const COMMON: &str = include_str!("../lua/include/common.lua");
const QUEUE: &str = include_str!("../lua/include/queue.lua");
const CLAIM: &str = include_str!("../lua/claim_next_run.lua");

/// Which includes an operation's script form needs (the library has all).
#[derive(Clone, Copy, PartialEq)]
enum Includes {
    Common,
    Queue,
    /// The queue's, and the claim's definitions (finalize_run chains a claim).
    QueueAndClaim,
}

struct Operation {
    name: &'static str,
    file: &'static str,
    includes: Includes,
    read_only: bool,
}

macro_rules! op {
    ($name:literal, $includes:ident) => {
        op!($name, $includes, false)
    };
    ($name:literal, $includes:ident, $read_only:expr) => {
        Operation {
            name: $name,
            file: include_str!(concat!("../lua/", $name, ".lua")),
            includes: Includes::$includes,
            read_only: $read_only,
        }
    };
}

const READ_ONLY: bool = true;

const OPERATIONS: &[Operation] = &[
    op!("create_run", Queue),
    op!("claim_next_run", Queue),
    op!("renew_claim", Queue),
    op!("release_claim", Queue),
    op!("release_expired_claims", Queue),
    op!("append_events", Common),
    op!("append_audit_event", Common),
    op!("finalize_run", QueueAndClaim),
    op!("request_cancel", Queue),
    op!("list_runs", Common, READ_ONLY),
    op!("count_runs", Common, READ_ONLY),
    op!("run_stats", Common, READ_ONLY),
    op!("queue_stats", Queue),
    op!("reap", Queue),
    op!("release_pins", Queue),
    op!("set_groups", Queue),
    op!("pause", Queue),
    op!("set_limits", Queue),
    op!("register_runtime", Common),
    op!("heartbeat_runtime", Common),
    op!("mark_stale_runtime", Common),
    op!("register_queue", Common),
    op!("drop_locator", Common),
    op!("validate_active_claim", Common, READ_ONLY),
];

/// claim_next_run.lua split at its last line, `return claim(...)`: the
/// claim's definitions, and the body that calls them.
fn claim_parts() -> (&'static str, &'static str) {
    let body = CLAIM.trim_end();
    let last_line = body.rfind('\n').map_or(0, |at| at + 1);
    debug_assert!(body[last_line..].starts_with("return claim("), "claim_next_run.lua ends with its return");
    (&body[..last_line], &body[last_line..])
}

/// The script form of every operation (its includes, then its file), in the
/// order of OPERATIONS, built once per process.
fn script_codes() -> &'static [String] {
    static CODES: LazyLock<Vec<String>> = LazyLock::new(|| {
        OPERATIONS
            .iter()
            .map(|op| match op.includes {
                Includes::Common => [COMMON, op.file].concat(),
                Includes::Queue => [COMMON, QUEUE, op.file].concat(),
                Includes::QueueAndClaim => [COMMON, QUEUE, claim_parts().0, op.file].concat(),
            })
            .collect()
    });
    &CODES
}

/// The Functions library: every operation, the includes defined once.
///
/// Its code, in order: the `#!lua name=` line; `local KEYS, ARGV`, which
/// every operation reads as it reads the globals of a script; the includes
/// and the claim's definitions; each operation's file as the body of a local
/// function; and one `redis.register_function` per operation whose callback
/// binds the call's keys and arguments, resets the per-call state of the
/// includes (`bind_call` in queue.lua), and runs the body. Redis runs one
/// call at a time, so rebinding those locals per call is safe.
pub struct Library {
    /// `runledger_<hash>`.
    pub name: String,
    /// The code `FUNCTION LOAD` takes.
    pub code: String,
    hash: String,
}

/// Stands for the hash while the code that it is the hash of is built.
const HASH_MARK: &str = "@HASH@";

impl Library {
    fn build() -> Library {
        let (claim_definitions, claim_body) = claim_parts();
        let mut code = format!("#!lua name=runledger_{HASH_MARK}\nlocal KEYS, ARGV = {{}}, {{}}\n");
        code.push_str(COMMON);
        code.push_str(QUEUE);
        code.push_str(claim_definitions);
        for op in OPERATIONS {
            let (name, body) = (op.name, if op.name == "claim_next_run" { claim_body } else { op.file });
            code.push_str(&format!("\nlocal function op_{name}()\n{body}\nend\n"));
        }
        for op in OPERATIONS {
            let name = op.name;
            let flags = if op.read_only { ", flags = { 'no-writes' }" } else { "" };
            code.push_str(&format!(
                "redis.register_function{{ function_name = 'rl{HASH_MARK}_{name}', callback = function(keys, args) \
                 KEYS, ARGV = keys, args; bind_call(); return op_{name}() end{flags} }}\n"
            ));
        }
        let hash = Script::new(&code).get_hash()[..16].to_string();
        Library { name: format!("runledger_{hash}"), code: code.replace(HASH_MARK, &hash), hash }
    }

    /// The name `FCALL` calls operation `name` by.
    pub fn function(&self, name: &str) -> String {
        format!("rl{}_{name}", self.hash)
    }
}

/// The library of this build, built once per process.
pub fn library() -> &'static Library {
    static LIBRARY: LazyLock<Library> = LazyLock::new(Library::build);
    &LIBRARY
}

/// Every operation, built once per process.
pub struct Scripts {
    pub create_run: Lua,
    pub claim_next_run: Lua,
    pub renew_claim: Lua,
    pub release_claim: Lua,
    pub release_expired_claims: Lua,
    pub append_events: Lua,
    pub append_audit_event: Lua,
    pub finalize_run: Lua,
    pub request_cancel: Lua,
    pub list_runs: Lua,
    pub count_runs: Lua,
    pub run_stats: Lua,
    pub queue_stats: Lua,
    pub reap: Lua,
    pub release_pins: Lua,
    pub set_groups: Lua,
    pub pause: Lua,
    pub set_limits: Lua,
    pub register_runtime: Lua,
    pub heartbeat_runtime: Lua,
    pub mark_stale_runtime: Lua,
    pub register_queue: Lua,
    pub drop_locator: Lua,
    pub validate_active_claim: Lua,
}

impl Scripts {
    pub fn new() -> Self {
        let library = library();
        let op = |name: &'static str| {
            let at = OPERATIONS.iter().position(|op| op.name == name);
            // Every name below is in OPERATIONS (the unit test checks each field).
            let at = at.unwrap_or_else(|| panic!("{name} is not an operation of lua/"));
            let lua = Lua::new(name, &script_codes()[at], library);
            if OPERATIONS[at].read_only { lua.read_only() } else { lua }
        };
        Scripts {
            create_run: op("create_run"),
            claim_next_run: op("claim_next_run"),
            renew_claim: op("renew_claim"),
            release_claim: op("release_claim"),
            release_expired_claims: op("release_expired_claims"),
            append_events: op("append_events"),
            append_audit_event: op("append_audit_event"),
            finalize_run: op("finalize_run"),
            request_cancel: op("request_cancel"),
            list_runs: op("list_runs"),
            count_runs: op("count_runs"),
            run_stats: op("run_stats"),
            queue_stats: op("queue_stats"),
            reap: op("reap"),
            release_pins: op("release_pins"),
            set_groups: op("set_groups"),
            pause: op("pause"),
            set_limits: op("set_limits"),
            register_runtime: op("register_runtime"),
            heartbeat_runtime: op("heartbeat_runtime"),
            mark_stale_runtime: op("mark_stale_runtime"),
            register_queue: op("register_queue"),
            drop_locator: op("drop_locator"),
            validate_active_claim: op("validate_active_claim"),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{OPERATIONS, Scripts, library};

    #[test]
    fn the_library_registers_every_operation_under_its_hash() {
        let library = library();
        let hash = library.name.strip_prefix("runledger_").expect("runledger_<hash>");
        assert!(hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "{}", library.name);
        assert!(library.code.starts_with(&format!("#!lua name={}\n", library.name)));
        assert!(!library.code.contains(super::HASH_MARK));
        for op in OPERATIONS {
            let registration = format!("function_name = 'rl{hash}_{}'", op.name);
            assert_eq!(library.code.matches(&registration).count(), 1, "{} is registered once", op.name);
            let line = library.code.lines().find(|l| l.contains(&registration)).unwrap_or_default();
            assert_eq!(line.contains("'no-writes'"), op.read_only, "{}: no-writes only on reads", op.name);
        }
        // The includes are defined once, not once per operation.
        assert_eq!(library.code.matches("local function check_holder(").count(), 1);
        assert_eq!(library.code.matches("local function claim(").count(), 1);
    }

    #[test]
    fn finalize_run_carries_the_claim_without_its_return() {
        let s = Scripts::new();
        assert!(s.claim_next_run.code.trim_end().ends_with("return claim(ARGV[1], parse_claim(2))"));
        let finalize = s.finalize_run.code;
        for definition in ["local function parse_claim(", "local function claim_again(", "local function claim("] {
            assert!(finalize.contains(definition), "finalize_run lacks {definition}");
        }
        assert!(!finalize.contains("\nreturn claim("), "finalize_run must not return the claim's reply as its own");
        // Its own code comes last, after every definition it uses.
        assert!(finalize.trim_end().ends_with("return reply"), "finalize_run ends with its own return");
    }
}
