//! Key names. The README's key table documents each of them; this file is the
//! one place that spells them.

/// The keys of one queue. All of them carry the hash tag `{Q}`, so everything
/// a script touches lives in the queue's Redis Cluster slot.
#[derive(Clone, Debug)]
pub struct QueueKeys {
    /// `<prefix>:{<queue>}:`, the base every key of the queue starts with.
    pub base: String,
}

impl QueueKeys {
    pub fn new(prefix: &str, queue: &str) -> Self {
        QueueKeys { base: format!("{prefix}:{{{queue}}}:") }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    pub fn queued(&self) -> String {
        self.key("queued")
    }
    pub fn leases(&self) -> String {
        self.key("leases")
    }
    pub fn delayed(&self) -> String {
        self.key("delayed")
    }
    pub fn deadlines(&self) -> String {
        self.key("deadlines")
    }
    pub fn finished(&self) -> String {
        self.key("finished")
    }
    /// HASH runner_id -> how many of its runs are queued.
    pub fn runners(&self) -> String {
        self.key("runners")
    }
    /// ZSET of runs created `running` (direct execution), by start time.
    pub fn running(&self) -> String {
        self.key("running")
    }
    /// The answer of one request, for a resend after a lost reply.
    pub fn receipt(&self, request: &str) -> String {
        self.key(&format!("receipt:{request}"))
    }
    /// Scratch STREAM a finish copies a run's events through (and renames
    /// back at once), which compacts them; never there between calls.
    pub fn events_copy(&self) -> String {
        self.key("events-copy")
    }
    pub fn stats(&self) -> String {
        self.key("stats")
    }
    /// ZSET of retained runs that died (lease expired on their last attempt),
    /// score = when (ms); a purge removes a run from it.
    pub fn dead(&self) -> String {
        self.key("dead")
    }
    pub fn wake(&self) -> String {
        self.key("wake")
    }
    /// Wake-up list of the workers filtering on one runner.
    pub fn runner_wake(&self, runner_id: &str) -> String {
        self.key(&format!("wake:runner:{runner_id}"))
    }
    /// Wake-up list of one runtime's pinned runs.
    pub fn pin_wake(&self, runtime_id: &str) -> String {
        self.key(&format!("wake:pin:{runtime_id}"))
    }
    /// HASH runner_id -> until (ms): runners that filtered workers wait for.
    pub fn listeners(&self) -> String {
        self.key("listeners")
    }
    pub fn cancel_channel(&self) -> String {
        self.key("cancel")
    }
    pub fn pins(&self) -> String {
        self.key("pins")
    }
    /// HASH `next_due`, `pinned`, `lanes`: what lets a claim skip probes that would find nothing.
    pub fn hints(&self) -> String {
        self.key("hints")
    }
    pub fn runs_index(&self) -> String {
        self.key("runs")
    }
    pub fn scope_index(&self, scope: &str, value: &str) -> String {
        self.key(&format!("idx:{scope}:{value}"))
    }
    pub fn run(&self, run_id: &str) -> String {
        self.key(&format!("run:{run_id}"))
    }
    /// `events:<run_id>`, not `run:<run_id>:events`: a run id may contain
    /// `:`, and no run's hash may be another run's stream.
    pub fn events(&self, run_id: &str) -> String {
        self.key(&format!("events:{run_id}"))
    }
    /// HASH: the JSON documents of this queue's runs (`metadata`,
    /// `authorization`, `usage`, `cost`: [`DOCUMENTS`]) too long to stay in
    /// their run hash, which holds [`DOCS_MARK`] in that field instead; the
    /// field here is [`doc_field`].
    pub fn docs_hash(&self) -> String {
        self.key("docs")
    }
    /// STRING: where an earlier build kept one long document of a run (its
    /// hash holds [`DOC_MARK`] then); still read, and deleted with the run.
    pub fn doc(&self, field: &str, run_id: &str) -> String {
        format!("{}doc:{field}:{run_id}", self.base)
    }

    /// The earlier build's doc keys of one run, in the order of [`DOCUMENTS`].
    pub fn docs(&self, run_id: &str) -> [String; 4] {
        DOCUMENTS.map(|field| self.doc(field, run_id))
    }

    /// Queue settings: its number, id clock and lane layout mark (HASH).
    pub fn meta(&self) -> String {
        self.key("meta")
    }
    /// ZSET: the runs of `queued` of one runner (every one, always).
    pub fn runner_lane(&self, runner_id: &str) -> String {
        self.key(&format!("runner:{runner_id}"))
    }
    pub fn pinned_lane(&self, runtime_id: &str) -> String {
        self.key(&format!("pinned:{runtime_id}"))
    }

    /// ZSET: the queued, due runs of one group (see groups in `lua/include/queue.lua`).
    /// The word after the group is last, so no group's key is another's.
    pub fn group_queued(&self, group: &str) -> String {
        self.key(&format!("group:{group}:queued"))
    }
    /// ZSET: those of a group's runs now in their claim lane.
    pub fn group_admitted(&self, group: &str) -> String {
        self.key(&format!("group:{group}:admitted"))
    }
    /// ZSET: a group's claimed runs, score = lease expiry (ms).
    pub fn group_active(&self, group: &str) -> String {
        self.key(&format!("group:{group}:active"))
    }
    /// SET: the groups with queued runs.
    pub fn groups(&self) -> String {
        self.key("groups")
    }
    /// HASH group -> its own limit.
    pub fn group_limits(&self) -> String {
        self.key("group-limits")
    }
    /// HASH group -> its own rate limit, `N/MS` (see Limits in `lua/include/queue.lua`).
    pub fn group_rate_limits(&self) -> String {
        self.key("group-rate-limits")
    }
    /// HASH group -> its own cap of queued runs.
    pub fn group_caps(&self) -> String {
        self.key("group-caps")
    }
    /// SET: paused groups.
    pub fn paused_groups(&self) -> String {
        self.key("paused-groups")
    }
    /// STREAM: the queue's audit entries (pause, resume).
    pub fn audit(&self) -> String {
        self.key("audit")
    }
    /// STRING: claims in the queue's rate window; expires at the window's end.
    pub fn rate(&self) -> String {
        self.key("rate")
    }
    /// STRING: claims of one group in its rate window.
    pub fn group_rate(&self, group: &str) -> String {
        self.key(&format!("group:{group}:rate"))
    }
    /// ZSET: groups whose rate window ends, score = its end (ms).
    pub fn group_rates(&self) -> String {
        self.key("group-rates")
    }
    /// HASH while a cap is set: queued runs of the queue (`queue`), of a
    /// group (`g:<group>`), of a workspace (`w:<workspace>`).
    pub fn queued_count(&self) -> String {
        self.key("queued-count")
    }

    /// KEYS[1..7] of every queue script, in the order of `lua/include/queue.lua`.
    pub fn fixed(&self) -> [String; 7] {
        [self.queued(), self.leases(), self.delayed(), self.deadlines(), self.finished(), self.stats(), self.wake()]
    }
}

/// The run fields that hold JSON documents; one longer than 64 bytes (Redis's
/// stock `hash-max-listpack-value`) lives in its own key (see `doc_value` in
/// lua/include/common.lua), so the run hash stays a listpack.
pub const DOCUMENTS: [&str; 4] = ["metadata", "authorization", "usage", "cost"];

/// What a run hash holds in a document field whose document lives in the
/// queue's docs hash ([`QueueKeys::docs_hash`]).
pub const DOCS_MARK: &str = "@docs";

/// What a run hash of an earlier build holds in a document field whose
/// document lives in a key of its own ([`QueueKeys::doc`]).
pub const DOC_MARK: &str = "@doc";

/// The field of the docs hash that holds document `field` (one of
/// [`DOCUMENTS`]) of a run: its initial, `:`, the run id (short: a field per
/// long document of every run).
pub fn doc_field(field: &str, run_id: &str) -> String {
    format!("{}:{run_id}", &field[..1])
}

/// The docs hash fields of one run, in the order of [`DOCUMENTS`].
pub fn doc_fields(run_id: &str) -> [String; 4] {
    DOCUMENTS.map(|field| doc_field(field, run_id))
}

/// A stored document field's text: `stored` itself, or the document it
/// points to (`in_hash` from the docs hash, `in_key` from an earlier build's doc key).
pub fn doc_text(stored: String, in_hash: Option<String>, in_key: Option<String>) -> String {
    match stored.as_str() {
        DOCS_MARK => in_hash.unwrap_or_default(),
        DOC_MARK => in_key.unwrap_or_default(),
        _ => stored,
    }
}

/// The most queues one prefix may have: a queue's number is the low part of
/// every run id it creates (see `lua/create_run.lua`).
pub const MAX_QUEUES: u32 = 4096;

/// Keys outside any queue. Each is written by single-key calls of its own,
/// so on a cluster none of them ever meets a queue's keys in one command.
#[derive(Clone, Debug)]
pub struct GlobalKeys {
    pub prefix: String,
}

impl GlobalKeys {
    /// `<P>:locator:<run_id>`: the queue a run lives in (STRING). Taken with
    /// SET NX before the run is created, so a run id names one run across
    /// every queue, and a run is found in one round trip.
    pub fn locator(&self, run_id: &str) -> String {
        format!("{}:locator:{run_id}", self.prefix)
    }
    /// `<P>:partitions`: partitioned queues and their partition counts (HASH).
    pub fn partitions(&self) -> String {
        format!("{}:partitions", self.prefix)
    }
    pub fn queues(&self) -> String {
        format!("{}:queues", self.prefix)
    }
    pub fn runtime_base(&self) -> String {
        format!("{}:runtime:", self.prefix)
    }
    pub fn runtime(&self, runtime_id: &str) -> String {
        format!("{}:runtime:{runtime_id}", self.prefix)
    }
    pub fn runtimes(&self) -> String {
        format!("{}:runtimes", self.prefix)
    }
    pub fn runtime_seq(&self) -> String {
        format!("{}:runtimes:seq", self.prefix)
    }
}
