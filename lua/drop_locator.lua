-- drop_locator: delete the locator of a purged run, if it still names the
-- purged run's queue.
--
-- KEYS[1] <P>:locator:<run_id>  STRING the queue the run id lives in
-- ARGV[1] the queue the run was purged from
-- Returns 1 when the locator was deleted, 0 when it names another queue (a
-- newer run of that id took it after the purged run's locator expired) or
-- is gone already. Safe to resend: a second call finds nothing to delete.
check_id('queue_name', ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
