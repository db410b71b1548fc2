//! Every statement, built once from the validated, quoted table names. Values
//! are always bound parameters.

use super::options::PostgresOptions;

/// The server's start time in µs: a server process id means something only
/// together with it (after a restart, old ids are meaningless).
pub(crate) const SERVER_START: &str =
    "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8";

/// The meta table's key of a service's fence floor (`$1` the service): the
/// highest fence granted, kept apart from the state row so that deleting
/// that row does not let a fence be granted twice.
const FLOOR_KEY: &str = "'fence:' || $1";

/// The meta table's key of a service's store revision (`$1` the service):
/// a value every write to the service's store rows replaces, under the
/// state row's lock, with [`NEW_REVISION`]. A write that finds the value it
/// saw last knows the store holds what it left there.
const REVISION_KEY: &str = "'rev:' || $1";

/// A fresh revision: the writing transaction's id (64 bits with its epoch,
/// never given twice by one cluster) and a random number (apart from a
/// database restored elsewhere, whose ids start again).
const NEW_REVISION: &str = "txid_current()::text || ':' || floor(random() * 1e15)::int8::text";

/// The server's `idle_session_timeout` for this session, as `SHOW` gives it
/// (`0`, `500ms`, `10min`, ...; null before PostgreSQL 14): a column of the
/// reads every node starts with, so that the pool learns it without a
/// statement of its own. See [`idle_timeout_ms`].
const IDLE_SESSION_TIMEOUT: &str = "(SELECT current_setting('idle_session_timeout', true))";

/// The column of [`Sql::snapshot`] and [`Sql::acquire_read`] with the
/// server's `idle_session_timeout`.
pub(crate) const SNAPSHOT_IDLE_TIMEOUT: usize = 14;
pub(crate) const ACQUIRE_IDLE_TIMEOUT: usize = 12;

/// `idle_session_timeout` in ms from its `SHOW` form; `None` if it does not
/// parse.
pub(crate) fn idle_timeout_ms(text: &str) -> Option<u64> {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let n: u64 = text[..digits].parse().ok()?;
    let unit = match text[digits..].trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// A history row's checkpoint columns, as `summary` reads them.
const CHECKPOINT_OF_H: &str =
    "h.checkpoint, h.checkpoint_saved_ms, h.checkpoint_done, h.checkpoint_total";

/// The checkpoint columns of the history and their types: created with the
/// table, and added to a table made before checkpoints existed.
pub(crate) const CHECKPOINT_COLUMNS: [(&str, &str); 4] = [
    ("checkpoint", "text"),
    ("checkpoint_saved_ms", "bigint"),
    ("checkpoint_done", "bigint"),
    ("checkpoint_total", "bigint"),
];

/// Serialises Upsilon's table creation and migrations across nodes, per database.
pub(crate) const MIGRATION_LOCK: i64 = 0x7570_7369_6c6f_6e01;

fn ms(expr: &str) -> String {
    format!("floor(extract(epoch FROM {expr}) * 1000)::int8")
}

fn quote(name: &str) -> String {
    // Names are allow-listed (no quotes in them); quoting keeps keywords safe.
    format!("\"{name}\"")
}

/// FNV-1a, 64 bits: a stable hash for the notification channel's name.
fn fnv1a(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) meta: String,
    pub(crate) state: String,
    pub(crate) history: String,
    pub(crate) channel: String,
    pub(crate) format: String,
    pub(crate) snapshot: String,
    pub(crate) ensure_row: String,
    pub(crate) lock_row: String,
    pub(crate) acquire_read: String,
    /// [`Sql::acquire_read`] without the row lock: what a waiting node that
    /// finds the lease held needs, in the flight that opens its listening
    /// session. It answers whether the holder's session is gone as the
    /// locked read does (a wait counts the takeover grace from it).
    pub(crate) peek_read: String,
    pub(crate) grant: String,
    /// Records the fence just granted as the service's floor (`$2`, text).
    pub(crate) raise_floor: String,
    /// Lifts the service's floor to at least `$2` (text), for
    /// `Lock::raise_fence`.
    pub(crate) lift_floor: String,
    pub(crate) renew: String,
    pub(crate) release: String,
    pub(crate) current: String,
    pub(crate) force_release: String,
    pub(crate) raise_fence: String,
    pub(crate) start: String,
    pub(crate) finish: String,
    pub(crate) checkpoint: String,
    /// How many of the checkpoint columns the history has (`$1` the history
    /// table's name, `$2` their names).
    pub(crate) has_checkpoints: String,
    /// Adds the checkpoint columns the history lacks.
    pub(crate) add_checkpoints: String,
    pub(crate) finish_now: String,
    pub(crate) data_version: String,
    pub(crate) baseline: String,
    pub(crate) notify: String,
    /// Sets the service's store revision to a new value and returns it:
    /// part of every transaction that writes the service's store rows,
    /// after the state row's lock.
    pub(crate) bump_revision: String,
    /// The check of a write sent without reading first: locks the state
    /// row, then replaces the service's store revision with a new one
    /// (returned), and fails (division by zero) unless the row holds fence
    /// `$2`, data version `$4` and baseline `$5` (null for none), the meta
    /// table's format is `$3` and the revision was `$6`: nobody wrote the
    /// service's store rows since the write that left `$6`.
    pub(crate) guard: String,
    /// [`Sql::checkpoint`] (`$1` to `$8`) under the checks of
    /// [`Sql::guard`] (fence `$9`, format `$10`, data version `$11`,
    /// baseline `$12`, revision `$13`), without failing: the new revision
    /// (null if a check failed and nothing was written) and the rows
    /// written.
    pub(crate) guarded_checkpoint: String,
    /// Every service the tables hold something of.
    pub(crate) services: String,
    pub(crate) history_rows: String,
    /// The snapshot with the summaries of the given tasks only (`$2`
    /// versions, `$3` ids): what a write needs.
    pub(crate) snapshot_of_tasks: String,
    pub(crate) inspect: String,
    pub(crate) session_gone: String,
}

impl Sql {
    pub(crate) fn new(o: &PostgresOptions) -> Sql {
        let schema = quote(&o.schema);
        let m = format!("{schema}.{}", quote(&o.meta_table));
        let st = format!("{schema}.{}", quote(&o.state_table));
        let h = format!("{schema}.{}", quote(&o.history_table));
        let channel = format!(
            "upsilon_{:016x}",
            fnv1a(&format!("{}.{}", o.schema, o.state_table))
        );
        let format_col = format!("(SELECT value FROM {m} WHERE key = 'format')");
        let gone = format!(
            "coalesce(s.lease_pid IS NOT NULL AND s.lease_server_start = {SERVER_START}
               AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.lease_pid), false)"
        );
        let lease_read = format!(
            "SELECT {format_col}, s.granted, s.store_fence, s.lease_holder, s.lease_fence,
                    {}, {}, {gone},
                    (SELECT coalesce(max(fence), 0)::int8 FROM {h} WHERE service = $1),
                    s.lease_pid, s.lease_server_start,
                    (SELECT value FROM {m} WHERE key = {FLOOR_KEY}), {IDLE_SESSION_TIMEOUT},
                    s.data_version, s.baseline
             FROM {st} AS s CROSS JOIN LATERAL (SELECT clock_timestamp() AS now) AS c
             WHERE s.service = $1",
            ms("s.lease_expires"),
            ms("c.now")
        );
        let ttl = "clock_timestamp() + $4::float8 * interval '1 millisecond'";
        // An instant given in ms since the epoch; exact, as intervals count µs.
        let at = "to_timestamp(0) + $4::float8 * interval '1 millisecond'";
        Sql {
            format: format!("SELECT value FROM {m} WHERE key = 'format'"),
            snapshot: format!(
                "SELECT {format_col}, s.data_version, s.baseline, s.store_fence,
                        h.version, h.task_id, h.attempt, h.kind, h.state, h.fence,
                        {CHECKPOINT_OF_H}, {IDLE_SESSION_TIMEOUT}
                 FROM (VALUES (1)) AS one (x)
                 LEFT JOIN {st} AS s ON s.service = $1
                 LEFT JOIN {h} AS h ON h.service = $1
                 ORDER BY h.id"
            ),
            snapshot_of_tasks: format!(
                "SELECT {format_col}, s.data_version, s.baseline, s.store_fence,
                        h.version, h.task_id, h.attempt, h.kind, h.state, h.fence,
                        {CHECKPOINT_OF_H}
                 FROM (VALUES (1)) AS one (x)
                 LEFT JOIN {st} AS s ON s.service = $1
                 LEFT JOIN {h} AS h ON h.service = $1
                   AND (h.version, h.task_id) IN (SELECT * FROM unnest($2::text[], $3::text[]))
                 ORDER BY h.id"
            ),
            ensure_row: format!(
                "INSERT INTO {st} (service) VALUES ($1) ON CONFLICT (service) DO NOTHING"
            ),
            lock_row: format!("SELECT 1 FROM {st} WHERE service = $1 FOR UPDATE"),
            acquire_read: format!("{lease_read} FOR UPDATE OF s"),
            peek_read: lease_read,
            grant: format!(
                "UPDATE {st} SET granted = $2, lease_holder = $3, lease_fence = $2,
                        lease_expires = {at}, lease_pid = $5, lease_server_start = $6
                 WHERE service = $1 RETURNING 1"
            ),
            raise_floor: format!(
                "INSERT INTO {m} (key, value) VALUES ({FLOOR_KEY}, $2)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            ),
            lift_floor: format!(
                "INSERT INTO {m} (key, value) VALUES ({FLOOR_KEY}, $2)
                 ON CONFLICT (key) DO UPDATE
                 SET value = GREATEST({m}.value::int8, EXCLUDED.value::int8)::text"
            ),
            renew: format!(
                "UPDATE {st} SET lease_expires = {ttl}
                 WHERE service = $1 AND lease_holder = $2 AND lease_fence = $3
                   AND lease_expires > clock_timestamp()
                 RETURNING {}",
                ms("lease_expires")
            ),
            release: format!(
                "WITH r AS (
                   UPDATE {st} SET lease_holder = NULL, lease_fence = NULL, lease_expires = NULL,
                          lease_pid = NULL, lease_server_start = NULL
                   WHERE service = $1 AND lease_holder = $2 AND lease_fence = $3
                     AND lease_expires > clock_timestamp()
                   RETURNING service)
                 SELECT r.service FROM r CROSS JOIN LATERAL pg_notify($4, r.service) AS n"
            ),
            current: format!(
                "SELECT s.lease_holder, s.lease_fence, {}, {}, {gone},
                        s.lease_pid, s.lease_server_start, {format_col}
                 FROM (SELECT clock_timestamp() AS now) AS c
                 LEFT JOIN {st} AS s ON s.service = $1",
                ms("s.lease_expires"),
                ms("c.now")
            ),
            force_release: format!(
                "WITH old AS (
                   SELECT service, lease_holder, lease_fence, {} AS expires_ms
                   FROM {st}
                   WHERE service = $1 AND lease_holder IS NOT NULL FOR UPDATE),
                 r AS (
                   UPDATE {st} AS s SET lease_holder = NULL, lease_fence = NULL,
                          lease_expires = NULL, lease_pid = NULL, lease_server_start = NULL
                   FROM old WHERE s.service = old.service
                   RETURNING old.lease_holder, old.lease_fence, old.expires_ms,
                             s.data_version, s.baseline)
                 SELECT r.lease_holder, r.lease_fence, r.expires_ms, {},
                        r.data_version, r.baseline
                 FROM r CROSS JOIN LATERAL pg_notify($2, $1) AS n",
                ms("lease_expires"),
                ms("clock_timestamp()")
            ),
            raise_fence: format!("UPDATE {st} SET store_fence = $2 WHERE service = $1"),
            start: format!(
                "INSERT INTO {h} (service, version, task_id, attempt, kind, state, fence, holder,
                                  description, checkpoint, checkpoint_saved_ms, checkpoint_done,
                                  checkpoint_total, started)
                 VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8, $9, $10, $11, $12,
                         clock_timestamp())"
            ),
            checkpoint: format!(
                "UPDATE {h} SET checkpoint = $5, checkpoint_saved_ms = $6, checkpoint_done = $7,
                        checkpoint_total = $8
                 WHERE service = $1 AND version = $2 AND task_id = $3 AND attempt = $4"
            ),
            has_checkpoints: "SELECT count(*) FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attname = ANY($2::text[])
                   AND NOT attisdropped"
                .to_owned(),
            add_checkpoints: format!(
                "ALTER TABLE {h} {}",
                CHECKPOINT_COLUMNS
                    .iter()
                    .map(|(name, kind)| format!("ADD COLUMN IF NOT EXISTS {name} {kind}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            finish: format!(
                "UPDATE {h} SET state = $5, finished = clock_timestamp(), duration_ms = $6, error = $7
                 WHERE service = $1 AND version = $2 AND task_id = $3 AND attempt = $4"
            ),
            finish_now: format!(
                "UPDATE {h} SET state = $5, finished = clock_timestamp(), error = NULL,
                        duration_ms = {}
                 WHERE service = $1 AND version = $2 AND task_id = $3 AND attempt = $4",
                ms("clock_timestamp() - started")
            ),
            data_version: format!("UPDATE {st} SET data_version = $2 WHERE service = $1"),
            baseline: format!(
                "UPDATE {st} SET data_version = $2, baseline = $2 WHERE service = $1"
            ),
            notify: "SELECT 1 FROM pg_notify($1, $2) AS n".to_owned(),
            bump_revision: format!(
                "INSERT INTO {m} (key, value) VALUES ({REVISION_KEY}, {NEW_REVISION})
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
                 RETURNING value"
            ),
            guard: format!(
                "WITH {}
                 SELECT 1 / count(*)::int4, max(r.value) FROM r",
                guard_ctes(&st, &m, &format_col, 2)
            ),
            guarded_checkpoint: format!(
                "WITH {},
                 c AS (
                   UPDATE {h} SET checkpoint = $5, checkpoint_saved_ms = $6,
                          checkpoint_done = $7, checkpoint_total = $8
                   WHERE service = $1 AND version = $2 AND task_id = $3 AND attempt = $4
                     AND EXISTS (SELECT 1 FROM r)
                   RETURNING 1)
                 SELECT (SELECT max(value) FROM r), (SELECT count(*) FROM c)",
                guard_ctes(&st, &m, &format_col, 9)
            ),
            services: format!(
                "SELECT service FROM {st}
                  WHERE data_version IS NOT NULL OR baseline IS NOT NULL
                     OR lease_holder IS NOT NULL OR granted > 0 OR store_fence > 0
                 UNION SELECT service FROM {h}"
            ),
            history_rows: format!(
                "SELECT version, task_id, attempt, kind, state, fence, checkpoint,
                        checkpoint_saved_ms, checkpoint_done, checkpoint_total, holder,
                        description, {}, {}, duration_ms, error
                 FROM {h} WHERE service = $1 ORDER BY id",
                ms("started"),
                ms("finished")
            ),
            inspect: "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                             to_regclass($2) IS NOT NULL, to_regclass($3) IS NOT NULL,
                             to_regclass($4) IS NOT NULL"
                .to_owned(),
            session_gone: format!(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)
                        AND {SERVER_START} = $2"
            ),
            schema,
            meta: m,
            state: st,
            history: h,
            channel,
        }
    }

    /// The statements that create what `inspect` found missing, then record
    /// the format if no format is recorded.
    pub(crate) fn create(&self, missing: [bool; 4], format: u32) -> Vec<String> {
        let [schema, meta, state, history] = missing;
        let mut out = Vec::new();
        if schema {
            out.push(format!("CREATE SCHEMA {}", self.schema));
        }
        if meta {
            out.push(format!(
                "CREATE TABLE {} (key text PRIMARY KEY, value text NOT NULL)",
                self.meta
            ));
        }
        if state {
            out.push(format!(
                "CREATE TABLE {} (
                   service            text PRIMARY KEY,
                   data_version       text,
                   baseline           text,
                   store_fence        bigint NOT NULL DEFAULT 0,
                   granted            bigint NOT NULL DEFAULT 0,
                   lease_holder       text,
                   lease_fence        bigint,
                   lease_expires      timestamptz,
                   lease_pid          integer,
                   lease_server_start bigint)",
                self.state
            ));
        }
        if history {
            out.push(format!(
                "CREATE TABLE {} (
                   id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                   service     text NOT NULL,
                   version     text NOT NULL,
                   task_id     text NOT NULL,
                   attempt     integer NOT NULL,
                   kind        text NOT NULL,
                   state       text NOT NULL,
                   fence       bigint NOT NULL,
                   holder      text NOT NULL,
                   description text NOT NULL,
                   started     timestamptz NOT NULL,
                   finished    timestamptz,
                   duration_ms bigint,
                   error       text,
                   checkpoint          text,
                   checkpoint_saved_ms bigint,
                   checkpoint_done     bigint,
                   checkpoint_total    bigint,
                   UNIQUE (service, version, task_id, attempt))",
                self.history
            ));
        }
        out.push(format!(
            "INSERT INTO {} (key, value) VALUES ('format', '{format}') ON CONFLICT (key) DO NOTHING",
            self.meta
        ));
        out
    }
}

/// The guard's two CTEs: `locked` locks the state row of `$1` if it still
/// holds the store fence, format, data version and baseline bound at
/// `$first` to `$first + 3`, and `r` then replaces the service's revision
/// if it is still the one bound at `$first + 4`, returning the new one.
fn guard_ctes(st: &str, m: &str, format_col: &str, first: usize) -> String {
    let [fence, format, data, baseline, revision] = std::array::from_fn(|k| first + k);
    format!(
        "locked AS (
                   SELECT 1 FROM {st} AS s
                   WHERE s.service = $1 AND s.store_fence = ${fence} AND {format_col} = ${format}
                     AND s.data_version IS NOT DISTINCT FROM ${data}
                     AND s.baseline IS NOT DISTINCT FROM ${baseline}
                   FOR UPDATE OF s),
                 r AS (
                   UPDATE {m} SET value = {NEW_REVISION}
                   WHERE key = {REVISION_KEY} AND value = ${revision}
                     AND EXISTS (SELECT 1 FROM locked)
                   RETURNING value)"
    )
}
