//! What an operator does to runs by hand (the dashboard's buttons and the
//! CLI's `requeue` and `release --attempt`): cancel, requeue a run that
//! ended badly, release a stuck claim. Each is the host operation underneath
//! plus an audit event on the run (`operator.<action>`, with who did it), so
//! a run's stream says what was done to it and by whom.

use serde_json::{Value, json};

use super::Store;
use super::runs::Release;
use crate::error::{Error, Result};
use crate::model::{Run, RunStatus};
use crate::validate;

/// The run id a requeue of `run_id` creates: `<id>~r1`, and `<id>~r<n+1>`
/// for a run that is itself the n-th requeue. Deterministic, so a second
/// click (or a resend) finds the run the first one made.
pub fn requeued_run_id(run_id: &str) -> String {
    if let Some((base, n)) = run_id.rsplit_once("~r")
        && !n.starts_with('0')
        && let Ok(n) = n.parse::<u32>()
    {
        return format!("{base}~r{}", n.saturating_add(1));
    }
    format!("{run_id}~r1")
}

impl Store {
    /// `request_cancel`, then an `operator.cancel` audit event.
    pub async fn cancel_by_operator(&self, run_id: &str, reason: Option<&str>, actor: &str) -> Result<Run> {
        validate::id("actor", actor)?;
        let run = self.request_cancel(run_id, reason).await?;
        self.audit(run_id, "operator.cancel", json!({ "actor": actor, "reason": reason, "status": run.status }))
            .await?;
        Ok(run)
    }

    /// A new run with the fields of a run that ended `failed` (dead runs
    /// included), `timeout` or `cancelled`: same queue, runner, priority,
    /// scopes, metadata and authorization, id from [`requeued_run_id`],
    /// `requeued_from` in its metadata; not its deadline or delay, which
    /// were times for the first run. The old run stays as it ended
    /// (terminal runs stay terminal) and gets an `operator.requeue` audit
    /// event naming the new one. Requeuing the same run again returns the
    /// run the first requeue made.
    pub async fn requeue_run(&self, run_id: &str, actor: &str) -> Result<Run> {
        validate::id("actor", actor)?;
        let old = self.read_run_for_holder(run_id).await?;
        if !matches!(old.status, RunStatus::Failed | RunStatus::Timeout | RunStatus::Cancelled) {
            return Err(Error::Conflict(format!(
                "only failed, timeout or cancelled runs are requeued; run {run_id} is {}",
                old.status
            )));
        }
        let new_id = requeued_run_id(run_id);
        validate::id("requeued run_id", &new_id)?;
        let mut metadata = match old.metadata.clone() {
            Value::Object(map) => map,
            _ => Default::default(),
        };
        metadata.insert("requeued_from".into(), Value::String(run_id.to_string()));
        let new = crate::model::NewRun {
            run_id: new_id,
            runner_id: old.runner_id.clone(),
            queue: Some(old.queue_name.clone()),
            event_id: old.event_id.clone(),
            binding_id: old.binding_id.clone(),
            conversation_id: old.conversation_id.clone(),
            thread_id: old.thread_id.clone(),
            workspace_id: old.workspace_id.clone(),
            bot_id: old.bot_id.clone(),
            agent_id: old.agent_id.clone(),
            authorization: old.authorization.clone(),
            metadata: Some(Value::Object(metadata)),
            priority: old.priority,
            requested_runtime_id: old.requested_runtime_id.clone(),
            max_attempts: old.max_attempts.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
            ..Default::default()
        };
        let created = self.create_run(&new).await?;
        self.audit(run_id, "operator.requeue", json!({ "actor": actor, "new_run_id": created.run_id })).await?;
        Ok(created)
    }

    /// Takes a claim away from whoever holds it and puts the run back in its
    /// queue (a worker that hangs without losing its lease). `attempt` is the
    /// `dispatch_attempts` the operator saw: a claim taken since then (or a
    /// run no longer claimed) is a `Conflict`, so a resend or a second click
    /// never releases a newer claim. The holder finds its token stale on its
    /// next renew, event or finish. Then an `operator.release` audit event.
    pub async fn release_stuck_claim(
        &self,
        run_id: &str,
        attempt: i64,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<Run> {
        validate::id("actor", actor)?;
        if let Some(reason) = reason {
            validate::text("status_reason", reason, 4096)?;
        }
        let (keys, _) = self.run_keys(run_id).await?;
        let mut conn = self.conn().await?;
        let (status, token, attempts): (Option<String>, Option<String>, Option<i64>) = redis::cmd("HMGET")
            .arg(keys.run(run_id))
            .arg("status")
            .arg("claim_token")
            .arg("dispatch_attempts")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(e))?;
        let Some(status) = status else {
            return Err(Error::NotFound(format!("run {run_id} does not exist")));
        };
        let held = status == "claimed" && attempts == Some(attempt);
        let Some(token) = token.filter(|_| held) else {
            return Err(Error::Conflict(format!(
                "run {run_id} is not held by claim attempt {attempt} (status {status}, attempt {})",
                attempts.unwrap_or(0)
            )));
        };
        let release = Release {
            status: RunStatus::Queued,
            status_reason: Some(reason.unwrap_or("released by an operator").to_string()),
            ..Default::default()
        };
        let run = self.release_claim(run_id, &token, &release).await?;
        self.audit(run_id, "operator.release", json!({ "actor": actor, "reason": reason, "attempt": attempt })).await?;
        Ok(run)
    }

    async fn audit(&self, run_id: &str, event_type: &str, data: Value) -> Result<()> {
        self.append_audit_event(run_id, event_type, Some(&data), None).await.map(|_| ())
    }

    /// A run with its authorization (a requeue copies it); never its token.
    async fn read_run_for_holder(&self, run_id: &str) -> Result<Run> {
        let queue = self.locate(run_id).await?;
        let mut run = Run::from_fields(self.run_hash(run_id, &queue).await?, true)?;
        run.claim_token = None;
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::requeued_run_id;

    #[test]
    fn requeued_ids_count_up() {
        assert_eq!(requeued_run_id("x"), "x~r1");
        assert_eq!(requeued_run_id("x~r1"), "x~r2");
        assert_eq!(requeued_run_id("x~r9"), "x~r10");
        assert_eq!(requeued_run_id("x~rab"), "x~rab~r1");
        assert_eq!(requeued_run_id("x~r01"), "x~r01~r1");
    }
}
