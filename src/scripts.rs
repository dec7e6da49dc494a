//! The Lua scripts of `lua/`, each prepended with the includes it uses:
//! `lua/include/common.lua` (errors, checks, clock, fencing) for all, and
//! `lua/include/queue.lua` (lanes, finishing, requeueing, lease recovery) for
//! those that move runs. The claim lives whole in `lua/claim_next_run.lua`;
//! `finalize_run`, which can chain a claim after its finish, gets that file's
//! definitions too (all of it but its last line, the `return`).
//! Every call runs its includes' definitions again, so less is faster.
//!
//! [`redis::Script`] runs them by SHA and loads them again on NOSCRIPT (after
//! `SCRIPT FLUSH` or a restart); [`Lua::code`] serves pipelines, which cannot
//! use `Script` and load by hand.

use std::sync::LazyLock;

use redis::Script;

/// One script: its loaded form and its source.
pub struct Lua {
    pub script: Script,
    pub code: &'static str,
    /// False for scripts that only read: the write concern skips them.
    pub writes: bool,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Lua { script: Script::new(code), code, writes: true }
    }

    fn read_only(mut self) -> Self {
        self.writes = false;
        self
    }
}

macro_rules! lua {
    ($name:literal) => {
        Lua::new(concat!(include_str!("../lua/include/common.lua"), include_str!(concat!("../lua/", $name, ".lua"))))
    };
    ($name:literal, queue) => {
        Lua::new(concat!(
            include_str!("../lua/include/common.lua"),
            include_str!("../lua/include/queue.lua"),
            include_str!(concat!("../lua/", $name, ".lua"))
        ))
    };
}

const CLAIM: &str = include_str!("../lua/claim_next_run.lua");

/// claim_next_run.lua without its last line, `return claim(...)`: the claim's
/// definitions, for finalize_run.
fn claim_definitions() -> &'static str {
    let body = CLAIM.trim_end();
    let last_line = body.rfind('\n').map_or(0, |at| at + 1);
    debug_assert!(body[last_line..].starts_with("return claim("), "claim_next_run.lua ends with its return");
    &body[..last_line]
}

/// finalize_run.lua with the includes and the claim's definitions before it.
fn finalize_run() -> &'static str {
    static CODE: LazyLock<String> = LazyLock::new(|| {
        [
            include_str!("../lua/include/common.lua"),
            include_str!("../lua/include/queue.lua"),
            claim_definitions(),
            include_str!("../lua/finalize_run.lua"),
        ]
        .concat()
    });
    CODE.as_str()
}

/// Every script, loaded once per process.
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
    pub register_runtime: Lua,
    pub heartbeat_runtime: Lua,
    pub mark_stale_runtime: Lua,
    pub register_queue: Lua,
    pub drop_locator: Lua,
    pub validate_active_claim: Lua,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            create_run: lua!("create_run", queue),
            claim_next_run: lua!("claim_next_run", queue),
            renew_claim: lua!("renew_claim", queue),
            release_claim: lua!("release_claim", queue),
            release_expired_claims: lua!("release_expired_claims", queue),
            append_events: lua!("append_events"),
            append_audit_event: lua!("append_audit_event"),
            finalize_run: Lua::new(finalize_run()),
            request_cancel: lua!("request_cancel", queue),
            list_runs: lua!("list_runs").read_only(),
            count_runs: lua!("count_runs").read_only(),
            run_stats: lua!("run_stats").read_only(),
            queue_stats: lua!("queue_stats", queue),
            reap: lua!("reap", queue),
            release_pins: lua!("release_pins", queue),
            register_runtime: lua!("register_runtime"),
            heartbeat_runtime: lua!("heartbeat_runtime"),
            mark_stale_runtime: lua!("mark_stale_runtime"),
            register_queue: lua!("register_queue"),
            drop_locator: lua!("drop_locator"),
            validate_active_claim: lua!("validate_active_claim").read_only(),
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
    use super::Scripts;

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
