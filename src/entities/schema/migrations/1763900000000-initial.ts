import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * The initial schema (docs/contract.md, "Tables"), written as SQL so the partial indexes and constraints are exactly
 * what the sweep and the relay query by.
 */
export class Initial1763900000000 implements MigrationInterface {
  name = 'Initial1763900000000';

  async up(q: QueryRunner): Promise<void> {
    // squawk (npm run lint:migrations), annotated after release: timeouts guard tables in use; these are created here
    await q.query(`
      -- squawk-ignore-file require-lock-timeout, require-statement-timeout -- every table is new, in this transaction
      CREATE TABLE deployments (
        id uuid PRIMARY KEY,
        name varchar(63) NOT NULL,
        state varchar(16) NOT NULL CHECK (state IN ('pending', 'deploying', 'ready', 'failed', 'unknown')),
        version integer NOT NULL CHECK (version >= 1),
        current_attempt_id uuid,
        endpoint_url text,
        endpoint_kind varchar(16) CHECK (endpoint_kind IN ('node_port', 'cluster_dns')),
        last_ready_at timestamptz,
        state_changed_at timestamptz NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CHECK ((endpoint_url IS NULL) = (endpoint_kind IS NULL))
      )`);
    // Paged listing by state; the sweep's readiness set.
    await q.query(`CREATE INDEX deployments_state_id_idx ON deployments (state, id)`);
    await q.query(`CREATE INDEX deployments_ready_node_port_idx ON deployments (id) WHERE state = 'ready' AND endpoint_kind = 'node_port'`);

    await q.query(`
      CREATE TABLE attempts (
        id uuid PRIMARY KEY,
        deployment_id uuid NOT NULL REFERENCES deployments (id),
        number integer NOT NULL CHECK (number >= 1),
        status varchar(16) NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'abandoned', 'superseded')),
        started_at timestamptz,
        ended_at timestamptz,
        last_heartbeat_at timestamptz,
        reason text,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (deployment_id, number)
      )`);
    await q.query(
      `ALTER TABLE deployments ADD CONSTRAINT deployments_current_attempt_fk FOREIGN KEY (current_attempt_id) REFERENCES attempts (id) DEFERRABLE INITIALLY DEFERRED`,
    );
    // The sweep: running attempts by liveness (orphans) and by start (progress deadline).
    await q.query(`CREATE INDEX attempts_running_liveness_idx ON attempts ((COALESCE(last_heartbeat_at, started_at))) WHERE status = 'running'`);
    await q.query(`CREATE INDEX attempts_running_started_idx ON attempts (started_at) WHERE status = 'running'`);

    await q.query(`
      CREATE TABLE state_transitions (
        id bigserial PRIMARY KEY,
        deployment_id uuid NOT NULL REFERENCES deployments (id),
        attempt_id uuid,
        from_state varchar(16),
        to_state varchar(16) NOT NULL,
        version integer NOT NULL,
        reason varchar(64) NOT NULL,
        event_id varchar(200) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        UNIQUE (deployment_id, version)
      )`);

    await q.query(`
      CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        deployment_id uuid NOT NULL,
        version integer NOT NULL,
        fields jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz,
        stream_id varchar(64)
      )`);
    // The relay reads unpublished rows in id order; pruning reads published rows by age.
    await q.query(`CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL`);
    await q.query(`CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL`);

    await q.query(`
      CREATE TABLE processed_events (
        event_id varchar(200) PRIMARY KEY,
        event_name varchar(64) NOT NULL,
        deployment_id uuid NOT NULL,
        outcome varchar(16) NOT NULL,
        reason varchar(64) NOT NULL,
        version integer,
        processed_at timestamptz NOT NULL DEFAULT now()
      )`);
    await q.query(`CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP TABLE processed_events`);
    await q.query(`DROP TABLE outbox`);
    await q.query(`DROP TABLE state_transitions`);
    await q.query(`ALTER TABLE deployments DROP CONSTRAINT deployments_current_attempt_fk`);
    await q.query(`DROP TABLE attempts`);
    await q.query(`DROP TABLE deployments`);
  }
}
