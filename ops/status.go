package ops

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outboxd/outboxd/store"
)

// LSN is a WAL position, printed and JSON-encoded as Postgres writes it
// ("16/B374D848").
type LSN pglogrepl.LSN

// String returns the LSN in Postgres notation.
func (l LSN) String() string { return pglogrepl.LSN(l).String() }

// MarshalText encodes the LSN in Postgres notation.
func (l LSN) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText parses an LSN in Postgres notation.
func (l *LSN) UnmarshalText(b []byte) error {
	v, err := pglogrepl.ParseLSN(string(b))
	if err != nil {
		return err
	}
	*l = LSN(v)
	return nil
}

func lsnPtr(l pglogrepl.LSN) *LSN { v := LSN(l); return &v }

// Status is what `outboxd status` reports. Its JSON field names are stable
// (documented in ops/RUNBOOK.md); fields that cannot be known are null.
type Status struct {
	// OK is false when Problems is not empty: something needs attention.
	OK bool `json:"ok"`
	// Problems are the reasons for attention; the command exits 1 when any.
	Problems []string `json:"problems"`
	// Warnings are worth knowing but need no action by themselves.
	Warnings   []string         `json:"warnings"`
	CheckedAt  time.Time        `json:"checked_at"`
	Server     ServerStatus     `json:"server"`
	Slot       SlotStatus       `json:"slot"`
	Checkpoint CheckpointStatus `json:"checkpoint"`
	// Publication is nil for `slot status`.
	Publication *PublicationStatus `json:"publication,omitempty"`
	// Backlog is nil for `slot status`.
	Backlog *BacklogStatus `json:"backlog,omitempty"`
	// Config is the effective configuration, secrets redacted, keyed by
	// variable name; nil for `slot status`.
	Config map[string]string `json:"config,omitempty"`
	// Failover says whether the slot survives a promotion of a standby
	// (failover slots) and what is missing for it.
	Failover *FailoverStatus `json:"failover"`
}

// ServerStatus describes the database server.
type ServerStatus struct {
	Version    string `json:"version"`
	Database   string `json:"database"`
	InRecovery bool   `json:"in_recovery"`
	// CurrentWALLSN is pg_current_wal_lsn() (the replay position on a standby).
	CurrentWALLSN LSN `json:"current_wal_lsn"`
	// SystemIdentifier is "" when neither pg_control_system() nor
	// IDENTIFY_SYSTEM was allowed.
	SystemIdentifier string `json:"system_identifier"`
}

// SlotStatus is the replication slot as pg_replication_slots shows it, plus
// the WAL it costs.
type SlotStatus struct {
	Name      string `json:"name"`
	Exists    bool   `json:"exists"`
	Plugin    string `json:"plugin"`
	Database  string `json:"database"`
	Active    bool   `json:"active"`
	ActivePID *int32 `json:"active_pid"`
	// RestartLSN is the oldest WAL the slot keeps; ConfirmedFlushLSN is how far
	// the consumer confirmed.
	RestartLSN        *LSN `json:"restart_lsn"`
	ConfirmedFlushLSN *LSN `json:"confirmed_flush_lsn"`
	// WALStatus is reserved, extended, unreserved or lost ("" when the slot
	// does not exist).
	WALStatus string `json:"wal_status"`
	// SafeWALSizeBytes is how much more WAL can be written before the slot is
	// at risk of invalidation; null when max_slot_wal_keep_size is unlimited.
	SafeWALSizeBytes *int64 `json:"safe_wal_size_bytes"`
	// RetainedWALBytes is current_wal_lsn - restart_lsn: the WAL kept on disk
	// for the slot.
	RetainedWALBytes *int64 `json:"retained_wal_bytes"`
	// LagBytes is current_wal_lsn - confirmed_flush_lsn: how far behind the
	// consumer is.
	LagBytes *int64 `json:"lag_bytes"`
}

// CheckpointStatus is the slot's checkpoint row (store.CheckpointTable).
type CheckpointStatus struct {
	Exists     bool       `json:"exists"`
	LSN        *LSN       `json:"lsn"`
	UpdatedAt  *time.Time `json:"updated_at"`
	AgeSeconds *float64   `json:"age_seconds"`
	// SystemIdentifier is the cluster the checkpoint was written on;
	// SystemIdentifierMatch compares it with the server's (null when either is
	// unknown).
	SystemIdentifier      string `json:"system_identifier"`
	SystemIdentifierMatch *bool  `json:"system_identifier_match"`
	Timeline              *int32 `json:"timeline"`
	// CatchupPending is true from slot creation until the rows that were
	// unprocessed then have all settled.
	CatchupPending bool `json:"catchup_pending"`
}

// PublicationStatus says whether the publication exists and carries the
// outbox table's inserts.
type PublicationStatus struct {
	Name            string `json:"name"`
	Exists          bool   `json:"exists"`
	IncludesTable   bool   `json:"includes_table"`
	PublishesInsert bool   `json:"publishes_insert"`
	// TablePartitioned and ViaPartitionRoot: a partitioned outbox needs
	// publish_via_partition_root, or its rows arrive under partition names.
	TablePartitioned bool `json:"table_partitioned"`
	ViaPartitionRoot bool `json:"via_partition_root"`
}

// BacklogStatus counts what is still to deliver.
type BacklogStatus struct {
	// UnprocessedRows are pending rows (store.PendingPredicate: not
	// processed, NULL included; neither dead-lettered nor parked):
	// what a catch-up would read. Null when the count timed out.
	UnprocessedRows             *int64     `json:"unprocessed_rows"`
	OldestUnprocessedAt         *time.Time `json:"oldest_unprocessed_at"`
	OldestUnprocessedAgeSeconds *float64   `json:"oldest_unprocessed_age_seconds"`
	// DeadLetters is the number of dead letters (store.DeadLetterTable).
	DeadLetters *int64 `json:"dead_letters"`
	// Parked is the number of parked deliveries (store.ParkedTable); null when
	// the schema has no such table.
	Parked *int64 `json:"parked"`
	// Targets are the parked deliveries, dead letters and lag per target:
	// each own target (StatusOptions.Targets: each destination of
	// OUTBOXD_SINKS, or the default target), also with nothing waiting, and
	// any other target (subscriptions) that has any; by name. Null when they
	// could not be counted.
	Targets []store.TargetCount `json:"targets"`
}

// StatusOptions tune Status.
type StatusOptions struct {
	// SlotOnly limits the report to the server, the slot and its checkpoint.
	SlotOnly bool
	// MaxLagBytes is the lag above which the slot needs attention; default
	// 1 GiB.
	MaxLagBytes int64
	// MaxCatchupAge is how long a checkpoint may stay catchup_pending before it
	// needs attention; default 1h.
	MaxCatchupAge time.Duration
	// BacklogTimeout bounds the backlog count, a scan of the outbox table;
	// default 30s. A count that times out is reported as null with a warning.
	BacklogTimeout time.Duration
	// Config is the effective configuration (already redacted), copied into
	// the report.
	Config map[string]string
	// Targets are the daemon's own targets (each destination of
	// OUTBOXD_SINKS, or the default target), listed in Backlog.Targets also
	// when nothing waits for them.
	Targets []string
}

// Default thresholds of StatusOptions.
const (
	DefaultMaxLagBytes    = 1 << 30
	DefaultMaxCatchupAge  = time.Hour
	DefaultBacklogTimeout = 30 * time.Second
)

// Status inspects the slot, its checkpoint, the publication and the backlog,
// and says what needs attention. An error means the inspection itself failed
// (no connection, no privilege), not that something needs attention.
func (c *Client) Status(ctx context.Context, opts StatusOptions) (*Status, error) {
	if opts.MaxLagBytes == 0 {
		opts.MaxLagBytes = DefaultMaxLagBytes
	}
	if opts.MaxCatchupAge == 0 {
		opts.MaxCatchupAge = DefaultMaxCatchupAge
	}
	if opts.BacklogTimeout == 0 {
		opts.BacklogTimeout = DefaultBacklogTimeout
	}
	st := &Status{Problems: []string{}, Warnings: []string{}}
	if err := c.server(ctx, st); err != nil {
		return nil, err
	}
	slot, err := c.slot(ctx, &st.Slot, st.Server.CurrentWALLSN)
	if err != nil {
		return nil, err
	}
	c.failover(ctx, st, slot)
	haveTables, err := c.tables().Migrated(ctx)
	if err != nil {
		return nil, err
	}
	if !haveTables {
		st.Problems = append(st.Problems, fmt.Sprintf("outboxd's tables are missing in schema %q: run `outboxd migrate`", c.t.schema()))
	} else if err := c.checkpoint(ctx, &st.Checkpoint, st.Server.SystemIdentifier); err != nil {
		return nil, err
	}
	st.Warnings = append(st.Warnings, c.roleWarnings(ctx)...)
	if haveTables {
		st.Warnings = append(st.Warnings, c.routingWarnings(ctx)...)
	}
	if st.Server.SystemIdentifier == "" {
		st.Warnings = append(st.Warnings, "cannot read the server's system identifier (pg_control_system() and IDENTIFY_SYSTEM were refused): the checkpoint's cluster is not checked")
	}
	if !opts.SlotOnly {
		st.Config = opts.Config
		pub, err := c.publication(ctx)
		if err != nil {
			return nil, err
		}
		st.Publication = pub
		if haveTables {
			if st.Backlog, err = c.backlog(ctx, opts.BacklogTimeout, opts.Targets, &st.Warnings); err != nil {
				return nil, err
			}
		}
	}
	evaluate(st, opts, c.t.Table.String())
	return st, nil
}

// roleWarnings says when the connected role has more power than outboxd
// needs: superuser, or a role the server accepts for physical replication
// (pg_hba.conf `replication` entries), which can copy the whole cluster
// with pg_basebackup, pg_authid included. Logical replication on its own
// database (what outboxd uses) is matched by the database's name in
// pg_hba.conf, physical replication by the keyword `replication`: see
// migrations/roles.sql.
func (c *Client) roleWarnings(ctx context.Context) []string {
	var out []string
	var role string
	var super bool
	if err := c.pool.QueryRow(ctx, `SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user`).Scan(&role, &super); err != nil {
		c.log.Debug().Err(err).Msg("role attributes unavailable")
		return nil
	}
	if super {
		out = append(out, fmt.Sprintf("connected as superuser %q: outboxd needs only LOGIN REPLICATION and the grants of migrations/roles.sql", role))
	}
	if c.acceptsPhysicalReplication(ctx) {
		out = append(out, fmt.Sprintf("the server accepts physical replication connections from role %q (a pg_hba.conf line with database `replication`): it can copy the whole cluster with pg_basebackup; allow it only logical replication on its database (migrations/roles.sql)", role))
	}
	return out
}

// routingWarnings says when subscriptions exist but the server records no
// commit timestamps: a catch-up (slot reset, recreation) then routes the rows
// it re-reads with the subscriptions as they are, not as they were at each
// row's commit.
func (c *Client) routingWarnings(ctx context.Context) []string {
	subs, err := c.tables().AnySubscription(ctx)
	var track string
	if err == nil {
		err = c.pool.QueryRow(ctx, `SELECT current_setting('track_commit_timestamp')`).Scan(&track)
	}
	if err != nil {
		c.log.Debug().Err(err).Msg("commit timestamp setting unavailable")
		return nil
	}
	if subs && track != "on" {
		return []string{"track_commit_timestamp is off: a catch-up (first start, slot reset or recreation) routes the rows it reads with the subscriptions as they are then, not as they were at each row's commit; turn it on (a restart) for exact subscription windows"}
	}
	return nil
}

// acceptsPhysicalReplication tries a physical replication connection
// (replication=true) with the same credentials and says whether the server
// took it.
func (c *Client) acceptsPhysicalReplication(ctx context.Context) bool {
	cfg, err := pgconn.ParseConfig(c.t.DatabaseURL)
	if err != nil {
		return false
	}
	setSession(cfg.RuntimeParams)
	cfg.RuntimeParams["replication"] = "true"
	cfg.ConnectTimeout = 10 * time.Second
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return false
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = pglogrepl.IdentifySystem(ctx, conn)
	return err == nil
}

func (c *Client) server(ctx context.Context, st *Status) error {
	var cur pglogrepl.LSN
	err := c.pool.QueryRow(ctx, `SELECT current_setting('server_version'), current_database(), pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') ELSE pg_current_wal_lsn() END, now()`).
		Scan(&st.Server.Version, &st.Server.Database, &st.Server.InRecovery, &cur, &st.CheckedAt)
	if err != nil {
		return fmt.Errorf("read server state: %w", err)
	}
	st.CheckedAt = st.CheckedAt.UTC()
	st.Server.CurrentWALLSN = LSN(cur)
	if id, err := c.identify(ctx); err == nil {
		st.Server.SystemIdentifier = id.SystemID
	} else {
		c.log.Debug().Err(err).Msg("system identifier unavailable")
	}
	return nil
}

// readSlot returns the slot's row, nil when there is none.
func (c *Client) readSlot(ctx context.Context) (*store.Slot, error) {
	s, _, err := store.ReadSlot(ctx, c.pool, c.t.Slot)
	return s, err
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (c *Client) slot(ctx context.Context, ss *SlotStatus, current LSN) (*store.Slot, error) {
	ss.Name = c.t.Slot
	s, err := c.readSlot(ctx)
	if err != nil || s == nil {
		return nil, err
	}
	ss.Exists = true
	ss.Plugin, ss.Database, ss.WALStatus = s.Plugin, s.Database, s.WALStatus
	ss.Active, ss.SafeWALSizeBytes = s.Active, s.SafeWALBytes
	if s.ActivePID != 0 {
		pid := s.ActivePID
		ss.ActivePID = &pid
	}
	if s.RestartLSN != nil {
		ss.RestartLSN = lsnPtr(*s.RestartLSN)
		d := bytesBehind(current, LSN(*s.RestartLSN))
		ss.RetainedWALBytes = &d
	}
	if s.ConfirmedFlush != nil {
		ss.ConfirmedFlushLSN = lsnPtr(*s.ConfirmedFlush)
		d := bytesBehind(current, LSN(*s.ConfirmedFlush))
		ss.LagBytes = &d
	}
	return s, nil
}

// bytesBehind is a - b in bytes, 0 when b is ahead (a slot may confirm a
// position a moment ahead of what a standby has replayed).
func bytesBehind(a, b LSN) int64 {
	if b >= a {
		return 0
	}
	return int64(a - b)
}

func (c *Client) checkpoint(ctx context.Context, cs *CheckpointStatus, serverID string) error {
	cp, err := c.tables().ReadCheckpoint(ctx, c.t.Slot)
	if errors.Is(err, store.ErrNoCheckpoint) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read checkpoint of slot %q: %w", c.t.Slot, err)
	}
	updated, age, tl := cp.UpdatedAt.UTC(), cp.AgeSeconds, cp.Timeline
	cs.SystemIdentifier, cs.CatchupPending = cp.SystemID, cp.CatchupPending
	cs.Exists, cs.LSN, cs.UpdatedAt, cs.AgeSeconds, cs.Timeline = true, lsnPtr(cp.LSN), &updated, &age, &tl
	if serverID != "" {
		match := serverID == cs.SystemIdentifier
		cs.SystemIdentifierMatch = &match
	}
	return nil
}

func (c *Client) publication(ctx context.Context) (*PublicationStatus, error) {
	p := &PublicationStatus{Name: c.t.Publication}
	// pg_publication_rel names a partitioned table listed by name (whose
	// leaves pg_publication_tables shows instead when not published via the
	// root); pg_publication_tables covers FOR ALL TABLES and TABLES IN SCHEMA.
	rel := pgx.Identifier{c.t.schema(), c.t.Table.Name}.Sanitize()
	err := c.pool.QueryRow(ctx, `SELECT p.pubinsert, p.pubviaroot,
  EXISTS (SELECT 1 FROM pg_publication_rel r WHERE r.prpubid = p.oid AND r.prrelid = to_regclass($4))
  OR EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3),
  coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($4)), false)
FROM pg_publication p WHERE p.pubname = $1`, c.t.Publication, c.t.schema(), c.t.Table.Name, rel).
		Scan(&p.PublishesInsert, &p.ViaPartitionRoot, &p.IncludesTable, &p.TablePartitioned)
	if errors.Is(err, pgx.ErrNoRows) {
		return p, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read publication %q: %w", c.t.Publication, err)
	}
	p.Exists = true
	return p, nil
}

func (c *Client) backlog(ctx context.Context, timeout time.Duration, own []string, warnings *[]string) (*BacklogStatus, error) {
	b := &BacklogStatus{}
	cols, err := c.columns(ctx)
	if err != nil {
		return nil, err
	}
	scope, err := c.tables().PresentScope(ctx)
	if err != nil {
		return nil, err
	}
	occurred, err := c.isTimestamp(ctx, "occurred_at")
	if err != nil {
		return nil, err
	}
	// count counts a table's rows; a role without SELECT on it gets a
	// warning and null, not a failed status.
	count := func(what, table string) (*int64, error) {
		n, err := c.tables().Count(ctx, table)
		if sqlState(err) == "42501" { // insufficient_privilege
			*warnings = append(*warnings, fmt.Sprintf("no privilege to count %s (SELECT on %s)", what, table))
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("count %s: %w", what, err)
		}
		return &n, nil
	}
	if scope.DeadLetters {
		if b.DeadLetters, err = count("dead letters", store.DeadLetterTable); err != nil {
			return nil, err
		}
	}
	// The parked table comes with the delivery engine (migration 2): older
	// schemas have none and its count is reported as unknown.
	if scope.Parked {
		if b.Parked, err = count("parked deliveries", store.ParkedTable); err != nil {
			return nil, err
		}
	}
	if scope.DeadLetters && scope.Parked && b.DeadLetters != nil && b.Parked != nil {
		targets, err := c.tables().TargetCounts(ctx)
		switch {
		case sqlState(err) == "42501":
			*warnings = append(*warnings, fmt.Sprintf("no privilege to count per target (SELECT on %s and %s)", store.ParkedTable, store.DeadLetterTable))
		case err != nil:
			return nil, fmt.Errorf("count per target: %w", err)
		default:
			b.Targets = withOwnTargets(targets, own)
		}
	}
	if !cols[store.ProcessedColumn] || !cols["id"] {
		*warnings = append(*warnings, fmt.Sprintf("table %s has no is_processed or id column: backlog unknown (run `outboxd migrate`)", c.t.Table))
		return b, nil
	}
	var pending store.Backlog
	// The count scans the table (there is deliberately no partial index on
	// the status columns, see migrations/001_outbox.sql): bound it.
	err = pgx.BeginTxFunc(ctx, c.pool, pgx.TxOptions{AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL statement_timeout = %d", timeout.Milliseconds())); err != nil {
			return err
		}
		var err error
		pending, err = store.On(tx, c.t.schema(), c.t.Table.Name).PendingBacklog(ctx, scope, occurred)
		return err
	})
	switch {
	case sqlState(err) == "57014": // query_canceled: the timeout
		*warnings = append(*warnings, fmt.Sprintf("backlog count gave up after %s (large table)", timeout))
		return b, nil
	case sqlState(err) == "42501": // insufficient_privilege
		*warnings = append(*warnings, fmt.Sprintf("no privilege to count unprocessed rows (SELECT on %s and %s)", c.t.Table, store.DeadLetterTable))
		return b, nil
	case err != nil:
		return nil, fmt.Errorf("count unprocessed rows: %w", err)
	}
	b.UnprocessedRows, b.OldestUnprocessedAgeSeconds = &pending.Rows, pending.OldestAgeSeconds
	if at := pending.OldestAt; at != nil {
		u := at.UTC()
		b.OldestUnprocessedAt = &u
	}
	return b, nil
}

// withOwnTargets is counts plus a zero count for each of own that has none,
// by target name.
func withOwnTargets(counts []store.TargetCount, own []string) []store.TargetCount {
	out := append([]store.TargetCount{}, counts...)
	for _, name := range own {
		if !slices.ContainsFunc(counts, func(c store.TargetCount) bool { return c.Target == name }) {
			out = append(out, store.TargetCount{Target: name})
		}
	}
	slices.SortFunc(out, func(a, b store.TargetCount) int { return strings.Compare(a.Target, b.Target) })
	return out
}

// evaluate fills Problems and Warnings from the facts and sets OK.
func evaluate(st *Status, opts StatusOptions, table string) {
	problem := func(format string, args ...any) { st.Problems = append(st.Problems, fmt.Sprintf(format, args...)) }
	warn := func(format string, args ...any) { st.Warnings = append(st.Warnings, fmt.Sprintf(format, args...)) }
	s, cp := st.Slot, st.Checkpoint
	switch {
	case !s.Exists && cp.Exists:
		problem("slot %q is missing although a checkpoint exists (dropped or lost): run `outboxd slot reset --yes` or start outboxd with OUTBOXD_SLOT_RECREATE=true; unprocessed rows are caught up from the table", s.Name)
	case !s.Exists:
		problem("slot %q does not exist: `outboxd run` creates it on its first start (or run `outboxd slot create`)", s.Name)
	case s.Database != st.Server.Database:
		problem("slot %q belongs to database %q, not %q: another deployment uses this slot name; set OUTBOXD_SLOT", s.Name, s.Database, st.Server.Database)
	case s.Plugin != "pgoutput":
		problem("slot %q uses plugin %q, outboxd needs pgoutput: run `outboxd slot reset --yes` to recreate it", s.Name, s.Plugin)
	case s.WALStatus == "lost":
		problem("slot %q was invalidated (wal_status lost, max_slot_wal_keep_size exceeded): run `outboxd slot reset --yes` or start outboxd with OUTBOXD_SLOT_RECREATE=true", s.Name)
	case s.WALStatus == "unreserved":
		problem("slot %q is about to be invalidated (wal_status unreserved: it retains more WAL than max_slot_wal_keep_size allows); check that outboxd is streaming and its webhook answers", s.Name)
	}
	if s.Exists && s.WALStatus == "extended" {
		warn("slot %q retains more WAL than max_wal_size (wal_status extended)", s.Name)
	}
	if s.Exists && !s.Active && s.WALStatus != "lost" {
		warn("slot %q is not active: no outboxd instance is streaming from it", s.Name)
	}
	if s.LagBytes != nil && *s.LagBytes > opts.MaxLagBytes && s.WALStatus != "lost" {
		problem("slot %q lags %s behind the current WAL position (threshold %s): check that outboxd is running and its webhook answers",
			s.Name, FormatBytes(*s.LagBytes), FormatBytes(opts.MaxLagBytes))
	}
	if cp.SystemIdentifierMatch != nil && !*cp.SystemIdentifierMatch {
		problem("the checkpoint of slot %q was written on cluster %s but this server is cluster %s (restored backup or failover to a new cluster): run `outboxd slot reset --yes`",
			s.Name, cp.SystemIdentifier, st.Server.SystemIdentifier)
	}
	if s.Exists && !cp.Exists && st.Server.SystemIdentifier != "" {
		warn("slot %q has no checkpoint: the next `outboxd run` recreates it and catches up from the table", s.Name)
	}
	if cp.Exists && cp.CatchupPending {
		age := time.Duration(*cp.AgeSeconds * float64(time.Second))
		if age > opts.MaxCatchupAge {
			problem("the catch-up of slot %q has been pending for %s (threshold %s): is outboxd running? its log says why the catch-up does not finish",
				s.Name, age.Round(time.Second), opts.MaxCatchupAge)
		} else {
			warn("catch-up from the table pending for slot %q since %s", s.Name, cp.UpdatedAt.Format(time.RFC3339))
		}
	}
	if p := st.Publication; p != nil {
		switch {
		case !p.Exists:
			problem("publication %q does not exist: run `outboxd migrate`", p.Name)
		case !p.IncludesTable:
			problem("publication %q does not include table %s: run `outboxd migrate`", p.Name, table)
		case !p.PublishesInsert:
			problem("publication %q does not publish inserts: run `outboxd migrate`", p.Name)
		case p.TablePartitioned && !p.ViaPartitionRoot:
			problem("publication %q does not set publish_via_partition_root and table %s is partitioned: run `outboxd migrate`", p.Name, table)
		}
	}
	st.OK = len(st.Problems) == 0
}
