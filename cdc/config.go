package cdc

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/store"
)

// Ledger is the part of the checkpoint tracker the reader drives.
type Ledger interface {
	Open(commitLSN pglogrepl.LSN, catchup bool) uint64
	Close(seq uint64, endLSN pglogrepl.LSN, events int) error
	AdvanceIdle(lsn pglogrepl.LSN) bool
	// Resume records the durable position a prepared stream starts from.
	Resume(lsn pglogrepl.LSN)
	Flushed() pglogrepl.LSN
	InFlight() int
}

// CheckpointStore loads and saves the durable checkpoint.
type CheckpointStore interface {
	Load(ctx context.Context) (store.Checkpoint, error)
	Save(ctx context.Context, cp store.Checkpoint) error
	// SetTimeline records the server's timeline after a promotion.
	SetTimeline(ctx context.Context, systemID string, timeline int32) error
}

// Config configures a Reader.
type Config struct {
	// ConnString is the libpq URL or key/value string of the database.
	ConnString  string
	Slot        string
	Publication string
	// SubscriptionPublication, when set, is read too: it publishes the
	// subscription table, whose changes are handed downstream in commit order.
	SubscriptionPublication string
	Table                   decode.Table
	// SlotRecreate allows recreating a lost or dropped slot (with a catch-up
	// from the table) when a checkpoint says one existed before.
	SlotRecreate bool
	// SlotFailover creates the slot with failover enabled on PostgreSQL 17
	// and later, and sets it on an existing slot that lacks it (clears it
	// when false): standbys with sync_replication_slots keep a copy of the
	// slot, which a promoted standby continues from. Below 17 it is ignored.
	SlotFailover bool
	// StatusInterval is how often standby status is sent; default 1s. It must
	// be well below the server's wal_sender_timeout.
	StatusInterval time.Duration
	// SilenceTimeout declares the connection dead when the server sends
	// nothing for this long although replies were requested; default 10s.
	SilenceTimeout time.Duration
	// IdleAdvanceBytes and IdleAdvanceInterval throttle idle advances: a
	// keepalive's WAL end is recorded (one checkpoint write) and then
	// confirmed when it is at least IdleAdvanceBytes ahead of the durable
	// position, when IdleAdvanceInterval passed since the last idle advance,
	// or when the server asks for a reply. Without a throttle an idle
	// outboxd would write the checkpoint at every keepalive, each write
	// making the WAL end move again. Defaults 1 MiB and 10s.
	IdleAdvanceBytes    uint64
	IdleAdvanceInterval time.Duration
	// ReconnectMin and ReconnectMax bound the jittered reconnect backoff;
	// defaults 100ms and 10s.
	ReconnectMin, ReconnectMax time.Duration
	// CatchupFetch is the number of rows fetched per round trip during
	// catch-up; default 1000.
	CatchupFetch int
	// HeartbeatInterval, when positive, emits a logical decoding message
	// (pg_logical_emit_message, not transactional, prefix outboxd_heartbeat)
	// on a regular connection whenever the stream has carried no data for
	// that long, so that the slot has something of its own database to decode
	// and confirm even when the outbox is idle (G7). It needs PostgreSQL 14 or
	// later (pgoutput's messages option); on older servers it is off, with a
	// warning. Zero disables it.
	HeartbeatInterval time.Duration
	// OnStreaming, when set, is called with true when streaming from the slot
	// starts (this process holds the slot) and with false when that session
	// ends. A standby waiting for the slot never gets true.
	OnStreaming func(active bool)
	// OnPosition, when set, is called after each standby status update with
	// the highest WAL position received and the durable position confirmed.
	OnPosition func(received, flushed pglogrepl.LSN)
	// OnTake, when set, is called each time this instance has taken the slot
	// (START_REPLICATION succeeded), before the session hands anything
	// downstream: the place to load what the slot holder acts on (routing
	// state, parked deliveries) as of now, not as of the process start. A
	// lost connection (ConnectionLost) is retried with the session; any
	// other error stops the reader. It is called again after such a retry,
	// so it must not keep half-done work.
	OnTake func(ctx context.Context) error
}

// HeartbeatPrefix is the prefix of the logical decoding messages the
// heartbeat emits.
const HeartbeatPrefix = "outboxd_heartbeat"

var slotNameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// WithDefaults returns a copy of c with the defaults filled in. NewReader
// needs them: it takes a config as WithDefaults returns it.
func (c Config) WithDefaults() Config {
	c.StatusInterval = cmp.Or(c.StatusInterval, time.Second)
	c.SilenceTimeout = cmp.Or(c.SilenceTimeout, 10*time.Second)
	c.IdleAdvanceBytes = cmp.Or(c.IdleAdvanceBytes, 1<<20)
	c.IdleAdvanceInterval = cmp.Or(c.IdleAdvanceInterval, 10*time.Second)
	c.ReconnectMin = cmp.Or(c.ReconnectMin, 100*time.Millisecond)
	c.ReconnectMax = cmp.Or(c.ReconnectMax, 10*time.Second)
	c.CatchupFetch = cmp.Or(c.CatchupFetch, 1000)
	return c
}

// Validate checks c with its defaults (WithDefaults) and changes nothing.
func (c Config) Validate() error {
	c = c.WithDefaults()
	if c.ConnString == "" {
		return errors.New("database URL is empty")
	}
	if !slotNameRE.MatchString(c.Slot) {
		return fmt.Errorf("slot name %q must be 1-63 characters of a-z, 0-9 and _", c.Slot)
	}
	if c.Publication == "" {
		return errors.New("publication name is empty")
	}
	if c.SilenceTimeout < 2*c.StatusInterval {
		return fmt.Errorf("silence timeout %s must be at least twice the status interval %s", c.SilenceTimeout, c.StatusInterval)
	}
	if c.HeartbeatInterval < 0 {
		return fmt.Errorf("heartbeat interval %s is negative", c.HeartbeatInterval)
	}
	return nil
}
