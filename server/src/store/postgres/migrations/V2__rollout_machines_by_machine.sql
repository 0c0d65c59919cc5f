-- Migration 2: creating a rollout looks up, per machine, the rollouts that
-- hold it (one rollout per machine at a time).
CREATE INDEX rollout_machines_by_machine ON rollout_machines (machine_id);
