package ops

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/outboxd/outboxd/store"
)

// FailoverStatus says whether a promoted standby can continue from the slot
// (failover slots, PostgreSQL 17 and later) and what is missing for it. On a
// primary it checks the slot and synchronized_standby_slots; on a standby
// the settings of slot synchronization and whether the slot is synchronized.
// Settings the role may not read are null.
type FailoverStatus struct {
	// ServerMajor is the server's PostgreSQL major; Supported is whether it
	// has failover slots (17 and later).
	ServerMajor int  `json:"server_major"`
	Supported   bool `json:"supported"`
	// Wanted is OUTBOXD_SLOT_FAILOVER.
	Wanted bool `json:"wanted"`
	// SlotFailover and SlotSynced are the slot's failover and synced
	// columns; null before 17 or without a slot.
	SlotFailover *bool `json:"slot_failover"`
	SlotSynced   *bool `json:"slot_synced"`
	// WALLevel is the server's wal_level (logical on both sides).
	WALLevel string `json:"wal_level"`
	// SynchronizedStandbySlots is the primary's setting: the physical slots
	// of the standbys that logical walsenders wait for, so that no consumer
	// gets ahead of a standby it could fail over to. StandbySlotsPhysical is
	// whether it names slots and each is an existing physical slot.
	SynchronizedStandbySlots *string `json:"synchronized_standby_slots"`
	StandbySlotsPhysical     *bool   `json:"standby_slots_physical"`
	// On a standby: sync_replication_slots, hot_standby_feedback,
	// primary_slot_name, and whether primary_conninfo names a dbname (slot
	// synchronization needs all four).
	SyncReplicationSlots  *bool   `json:"sync_replication_slots"`
	HotStandbyFeedback    *bool   `json:"hot_standby_feedback"`
	PrimarySlotName       *string `json:"primary_slot_name"`
	PrimaryConninfoDBName *bool   `json:"primary_conninfo_dbname"`
	// Ready is whether nothing is missing; Missing says what is, one item
	// each, also given as warnings.
	Ready   bool     `json:"ready"`
	Missing []string `json:"missing"`
}

var dbnameRE = regexp.MustCompile(`(^|\s)dbname\s*=\s*\S`)

// failover fills st.Failover. Below 17 it reports that failover slots are
// not available; the promotion path there is a recreation of the slot.
func (c *Client) failover(ctx context.Context, st *Status, slot *store.Slot) {
	f := &FailoverStatus{Wanted: c.t.SlotFailover, Missing: []string{}}
	st.Failover = f
	var num int
	if err := c.pool.QueryRow(ctx, `SELECT current_setting('server_version_num')::int, current_setting('wal_level')`).Scan(&num, &f.WALLevel); err != nil {
		c.log.Debug().Err(err).Msg("server version unavailable")
		return
	}
	f.ServerMajor = num / 10000
	f.Supported = f.ServerMajor >= store.FailoverSlotsMajor
	if slot != nil && f.Supported {
		f.SlotFailover, f.SlotSynced = slot.Failover, &slot.Synced
	}
	missing := func(format string, args ...any) { f.Missing = append(f.Missing, fmt.Sprintf(format, args...)) }
	switch {
	case !f.Supported:
		missing("failover slots need PostgreSQL 17 or later (server is %d): after a promotion the slot is missing; OUTBOXD_SLOT_RECREATE=true recreates it and catches up from the table", f.ServerMajor)
	case !f.Wanted:
		missing("OUTBOXD_SLOT_FAILOVER is false: the slot is not synchronized to standbys")
	case st.Server.InRecovery:
		c.standbyFailover(ctx, f, slot, missing)
	default:
		c.primaryFailover(ctx, f, slot, missing)
	}
	if f.Supported && f.WALLevel != "logical" {
		missing("wal_level is %s: logical decoding and slot synchronization need logical", f.WALLevel)
	}
	f.Ready = len(f.Missing) == 0
	if f.Supported && f.Wanted {
		for _, m := range f.Missing {
			st.Warnings = append(st.Warnings, "failover: "+m)
		}
	}
}

func (c *Client) primaryFailover(ctx context.Context, f *FailoverStatus, slot *store.Slot, missing func(string, ...any)) {
	if slot != nil && slot.Failover != nil && !*slot.Failover {
		missing("slot %q has failover off: the next `outboxd run` sets it (OUTBOXD_SLOT_FAILOVER)", c.t.Slot)
	}
	var setting string
	if err := c.pool.QueryRow(ctx, `SELECT current_setting('synchronized_standby_slots')`).Scan(&setting); err != nil {
		c.log.Debug().Err(err).Msg("synchronized_standby_slots unavailable")
		return
	}
	f.SynchronizedStandbySlots = &setting
	var names []string
	for n := range strings.SplitSeq(setting, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, strings.Trim(n, `"`))
		}
	}
	if len(names) == 0 {
		no := false
		f.StandbySlotsPhysical = &no
		missing("synchronized_standby_slots is empty on the primary: name the standby's physical slot (primary_slot_name), or outboxd may receive changes the standby never got, which a promotion then loses from under the synchronized slot")
		return
	}
	var physical int
	if err := c.pool.QueryRow(ctx, `SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_type = 'physical' AND slot_name = ANY($1)`, names).Scan(&physical); err != nil {
		c.log.Debug().Err(err).Msg("physical slots unavailable")
		return
	}
	ok := physical == len(names)
	f.StandbySlotsPhysical = &ok
	if !ok {
		missing("synchronized_standby_slots names %q, which are not all physical slots on this server: logical walsenders wait for them", setting)
	}
}

func (c *Client) standbyFailover(ctx context.Context, f *FailoverStatus, slot *store.Slot, missing func(string, ...any)) {
	var sync, feedback bool
	var primarySlot string
	if err := c.pool.QueryRow(ctx, `SELECT current_setting('sync_replication_slots')::bool, current_setting('hot_standby_feedback')::bool,
  current_setting('primary_slot_name')`).Scan(&sync, &feedback, &primarySlot); err != nil {
		c.log.Debug().Err(err).Msg("slot synchronization settings unavailable")
		return
	}
	f.SyncReplicationSlots, f.HotStandbyFeedback, f.PrimarySlotName = &sync, &feedback, &primarySlot
	if !sync {
		missing("sync_replication_slots is off on this standby: the slot is not copied here")
	}
	if !feedback {
		missing("hot_standby_feedback is off on this standby: slot synchronization needs it")
	}
	if primarySlot == "" {
		missing("primary_slot_name is empty on this standby: slot synchronization needs a physical slot on the primary (also named in its synchronized_standby_slots)")
	}
	// primary_conninfo is readable by superusers and pg_read_all_settings.
	var conninfo string
	if err := c.pool.QueryRow(ctx, `SELECT current_setting('primary_conninfo')`).Scan(&conninfo); err == nil {
		has := dbnameRE.MatchString(conninfo)
		f.PrimaryConninfoDBName = &has
		if !has {
			missing("primary_conninfo has no dbname on this standby: slot synchronization connects to a database of the primary")
		}
	}
	switch {
	case slot == nil:
		missing("slot %q is not on this standby (yet): it is synchronized once it has failover on and the standby has caught up with it", c.t.Slot)
	case !slot.Synced:
		missing("slot %q on this standby is not a synchronized copy (synced false)", c.t.Slot)
	}
}
