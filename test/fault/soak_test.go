package fault

import (
	"context"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/outboxd/outboxd/deliver"
	"github.com/outboxd/outboxd/internal/e2e"
)

// The randomized soak: a seeded generator of operations run against three
// outboxd instances on one slot, a dedicated Postgres behind a proxy, the
// default webhook and subscriptions with receivers of their own. The
// operations are application transactions of random sizes, tenants and event
// names (the product's families); subscription add, disable, enable and
// secret rotation; receivers failing (503) and recovering; kill -9 of the
// leader; SIGTERM of an instance; Postgres immediate restart; connection cuts;
// `outboxd slot reset --yes --force`.
//
// At the end, with every fault lifted and every subscription enabled, it
// checks per target (the default webhook and each subscription):
//   - lost 0: every row reached the default webhook; every row reached each
//     subscription it matched at its commit when the subscription was not
//     disabled between that commit and the moment the row was seen processed
//     (a disable meanwhile may legitimately leave it undelivered there, when a
//     catch-up after a slot reset re-routed it);
//   - outside the window 0: no subscription got an event it did not match at
//     the event's commit, rows a catch-up re-read after a slot reset
//     included;
//   - unsigned 0: every request verifies with a secret its target had;
//   - order: first receipts per organization follow commit order, per target;
//   - duplicates only inside the unconfirmed window: no copy of an event is
//     sent after a moment the row was seen processed (sampled every 500 ms and
//     after every operation);
//   - truthful rows: a row seen processed had been acknowledged by every
//     target that had to have it; at the end every row is processed with
//     processed_at set and 1 <= delivery_attempts <= requests seen for it; no
//     park and no dead letter remains.
//
// OUTBOXD_SOAK_SEED picks the seed (default 1) and OUTBOXD_SOAK_DURATION the
// length (default: a short run of soakShortSteps operations, part of the
// test command). A failure prints the command that replays its seed.

const soakShortSteps = 14

var soakEventNames = []string{
	"inventory_adjusted", "batch_started", "batch_completed", "batch_cancelled", "batch_failed",
	"timer_started", "timer_stopped", "recipe_created", "recipe_updated", "recipe_deleted",
	"product_created", "product_variant_created", "sku_created", "batch_metrics_computed",
}

var soakGlobs = [][]string{
	{}, {"batch_*"}, {"timer_*", "recipe_*"}, {"inventory_adjusted", "sku_created"}, {"product_*"},
}

const soakOrgs = 6

// soakSub is one subscription and its receiver.
type soakSub struct {
	id     int64
	org    *int64
	events []string
	recv   *Receiver
}

// subChange is a subscription's state from a position in commit order on.
type subChange struct {
	pos     int // rows committed before the change
	sub     int64
	enabled bool
	at      time.Time // after the commit returned
}

type soak struct {
	*rig
	seed      uint64
	rng       *rand.Rand
	envDirect map[string]string

	mu      sync.Mutex
	subs    []*soakSub
	changes []subChange
	resets  []int // positions at which a slot reset was done
	// seen maps a row id to the first moment it was seen processed.
	seen map[int64]time.Time
	// floor is the smallest id seen unprocessed at the last sample.
	floor int64
	// failing maps a receiver to when its outage ends.
	failing map[*Receiver]time.Time
	ops     map[string]int
	oplog   []string
	// expectedExit holds daemons whose exit an operation caused.
	expectedExit map[*daemon]bool
}

func soakSeed(t *testing.T) uint64 {
	s := os.Getenv("OUTBOXD_SOAK_SEED")
	if s == "" {
		return 1
	}
	v, err := strconv.ParseUint(s, 10, 64)
	require.NoError(t, err, "OUTBOXD_SOAK_SEED")
	return v
}

func soakDuration(t *testing.T) time.Duration {
	s := os.Getenv("OUTBOXD_SOAK_DURATION")
	if s == "" {
		return 0
	}
	d, err := time.ParseDuration(s)
	require.NoError(t, err, "OUTBOXD_SOAK_DURATION")
	return d
}

// soakRetrySchedule retries parked deliveries for about five minutes: longer
// than any outage the soak makes, so nothing is dead-lettered.
func soakRetrySchedule() string {
	steps := []string{"500ms", "1s", "2s"}
	for range 60 {
		steps = append(steps, "5s")
	}
	return strings.Join(steps, ",")
}

func TestSoak(t *testing.T) {
	t.Parallel()
	seed, dur := soakSeed(t), soakDuration(t)
	replay := fmt.Sprintf("OUTBOXD_SOAK_SEED=%d OUTBOXD_SOAK_DURATION=%s go test -race -count=1 -timeout 0 -run '^TestSoak$' -v ./test/fault", seed, dur)
	t.Logf("soak seed %d, %s; replay: %s", seed, map[bool]string{true: fmt.Sprint(dur), false: fmt.Sprintf("%d operations", soakShortSteps)}[dur > 0], replay)
	s := newSoak(t, seed, replay, "")
	start := time.Now()
	s.run(func(step int) string {
		if dur > 0 && time.Since(start) >= dur || dur == 0 && step >= soakShortSteps {
			return ""
		}
		return s.pick()
	})
}

// partitionedOutbox is an outbox partitioned by hash of id (rows of every
// transaction spread over three partitions), created before `migrate`.
const partitionedOutbox = `
CREATE TABLE domain_event (` + e2e.OutboxColumns + `,
  PRIMARY KEY (id)
) PARTITION BY HASH (id);
CREATE TABLE domain_event_h0 PARTITION OF domain_event FOR VALUES WITH (MODULUS 3, REMAINDER 0);
CREATE TABLE domain_event_h1 PARTITION OF domain_event FOR VALUES WITH (MODULUS 3, REMAINDER 1);
CREATE TABLE domain_event_h2 PARTITION OF domain_event FOR VALUES WITH (MODULUS 3, REMAINDER 2);`

// TestSoakScripted runs the soak's world through fixed sequences: the
// combinations the guarantees were broken on, checked by the soak's judge.
func TestSoakScripted(t *testing.T) {
	t.Parallel()
	for _, sc := range []struct {
		name   string
		before string // SQL run before migrate
		ops    []string
	}{
		// Three instances; subscriptions change while deliveries to one of
		// them are parked, and the leader is killed twice meanwhile.
		{name: "three-instances-subscriptions-parked-leader-killed", ops: []string{
			"sub-add", "fail-sub-long", "big-transaction", "sub-disable", "kill9-leader", "sub-add",
			"sub-enable", "sub-rotate", "kill9-leader", "big-transaction", "sub-disable",
		}},
		// A partitioned outbox (hash of id, three partitions) through a kill
		// -9, a slot reset and a Postgres restart.
		{name: "partitioned-outbox-kill9-slot-reset", before: partitionedOutbox, ops: []string{
			"big-transaction", "kill9-leader", "fail-default-long", "slot-reset", "big-transaction",
			"pg-restart-immediate", "kill9-leader", "slot-reset",
		}},
	} {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			s := newSoak(t, 1, fmt.Sprintf("go test -race -count=1 -run '^TestSoakScripted$/^%s$' -v ./test/fault", sc.name), sc.before)
			s.run(func(step int) string {
				if step >= len(sc.ops) {
					return ""
				}
				return sc.ops[step]
			})
		})
	}
}

// newSoak builds the soak's world: a dedicated Postgres (before, if set, runs
// before migrate), three instances, two subscriptions.
func newSoak(t *testing.T, seed uint64, replay, before string) *soak {
	r := newRig(t, rigOpts{
		settings: map[string]string{"track_commit_timestamp": "on"},
		orgs:     soakOrgs,
		before:   before,
		env: map[string]string{
			"OUTBOXD_WEBHOOK_MAX_ATTEMPTS": "3",
			"OUTBOXD_RETRY_SCHEDULE":       soakRetrySchedule(),
			"OUTBOXD_SHUTDOWN_TIMEOUT":     "5s",
			"OUTBOXD_WEBHOOK_TIMEOUT":      "5s",
		},
	})
	s := &soak{rig: r, seed: seed, rng: rand.New(rand.NewPCG(seed, 0x50a4)),
		envDirect: e2e.Env(r.url, r.slot, r.recv.URL(), nil),
		seen:      map[int64]time.Time{}, failing: map[*Receiver]time.Time{}, ops: map[string]int{},
		expectedExit: map[*daemon]bool{}}
	r.gen = NewGenerator(r.pool, soakOrgs, seed)
	r.gen.SetNames(soakEventNames)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("soak FAILED with seed %d; operations:\n%s\nreplay: %s", seed, strings.Join(s.oplog, "\n"), replay)
		}
	})
	r.recv.SetBehaviour(s.behaviour(r.recv))
	for range 3 {
		r.start(nil)
	}
	s.waitLeader()
	// Two subscriptions from the start: one platform-wide, one of a tenant.
	s.addSub(nil, []string{})
	s.addSub(ptr(int64(1)), []string{"batch_*"})
	return s
}

// run drives traffic and the operations next names (by step; "" ends), then
// lifts every fault, waits for the world to settle and judges it.
func (s *soak) run(next func(step int) string) {
	stopGen := s.gen.Start(20*time.Millisecond, 8, 0)
	stopSampler := s.sampleEvery(500 * time.Millisecond)
	for step := 0; ; step++ {
		name := next(step)
		if name == "" {
			break
		}
		s.do(name)
		s.sample()
		// The pause between operations is part of the workload: traffic
		// flows under whatever the last operation left.
		time.Sleep(time.Duration(300+s.rng.IntN(1700)) * time.Millisecond) //nolint:forbidigo // the pacing of faults, not a synchronisation
		s.checkExits()
	}
	stopGen()
	s.settleAll()
	stopSampler()
	s.verify()
}

func ptr[T any](v T) *T { return &v }

func (s *soak) logOp(format string, args ...any) {
	line := fmt.Sprintf("%s gen=%d %s", time.Now().Format("15:04:05.000"), s.gen.Len(), fmt.Sprintf(format, args...))
	s.mu.Lock()
	s.oplog = append(s.oplog, line)
	s.mu.Unlock()
	s.t.Log(line)
}

// behaviour answers 503 while the receiver's outage lasts.
func (s *soak) behaviour(recv *Receiver) Behaviour {
	return func(*Delivery) Answer {
		s.mu.Lock()
		until, ok := s.failing[recv]
		s.mu.Unlock()
		if ok && time.Now().Before(until) {
			return Answer{Status: http.StatusServiceUnavailable}
		}
		return Answer{}
	}
}

// soakOp is an operation of the soak and its weight in random runs (0:
// scripted runs only).
type soakOp struct {
	name   string
	weight int
	run    func(s *soak)
}

var soakOps = []soakOp{
	{"big-transaction", 1, (*soak).opBigTxn},
	{"sub-add", 2, (*soak).opSubAdd},
	{"sub-disable", 2, (*soak).opSubDisable},
	{"sub-enable", 2, (*soak).opSubEnable},
	{"sub-rotate", 1, (*soak).opSubRotate},
	{"receiver-503", 3, (*soak).opReceiverFail},
	{"kill9-leader", 2, (*soak).opKillLeader},
	{"sigterm", 1, (*soak).opSigterm},
	{"pg-restart-immediate", 1, (*soak).opPostgresRestart},
	{"connection-cut", 2, (*soak).opCut},
	{"slot-reset", 1, (*soak).opSlotReset},
	// A subscription's receiver (the last added) or the default webhook
	// down long enough for deliveries to park.
	{"fail-sub-long", 0, func(s *soak) {
		s.mu.Lock()
		sub := s.subs[len(s.subs)-1]
		s.mu.Unlock()
		s.fail(sub.recv, fmt.Sprintf("subscription %d", sub.id), 8*time.Second)
	}},
	{"fail-default-long", 0, func(s *soak) { s.fail(s.recv, "default webhook", 8*time.Second) }},
}

// pick returns a random operation's name, by weight.
func (s *soak) pick() string {
	total := 0
	for _, o := range soakOps {
		total += o.weight
	}
	n := s.rng.IntN(total)
	for _, o := range soakOps {
		if n < o.weight {
			return o.name
		}
		n -= o.weight
	}
	panic("unreachable")
}

// do runs the operation called name.
func (s *soak) do(name string) {
	for _, o := range soakOps {
		if o.name == name {
			s.mu.Lock()
			s.ops[o.name]++
			s.mu.Unlock()
			o.run(s)
			return
		}
	}
	s.t.Fatalf("unknown soak operation %q", name)
}

func (s *soak) opBigTxn() {
	n := 200 + s.rng.IntN(1800)
	_, err := s.gen.Txn(context.Background(), n)
	s.logOp("big transaction of %d rows: err=%v", n, err)
}

// secret returns a fresh whsec_ secret from the seeded generator.
func (s *soak) secret() string {
	b := make([]byte, 24)
	for i := range b {
		b[i] = byte(s.rng.IntN(256))
	}
	return "whsec_" + base64.StdEncoding.EncodeToString(b)
}

// change commits a subscription change in commit order with the generator's
// rows and records the subscription's state from there on.
func (s *soak) change(sub int64, enabled bool, sql string, args ...any) {
	s.t.Helper()
	pos, err := s.gen.CommitChange(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := s.pool.Exec(ctx, sql, args...)
		return err
	})
	require.NoError(s.t, err, "subscription change")
	s.mu.Lock()
	s.changes = append(s.changes, subChange{pos: pos, sub: sub, enabled: enabled, at: time.Now()})
	s.mu.Unlock()
}

func (s *soak) addSub(org *int64, events []string) *soakSub {
	s.t.Helper()
	recv := NewReceiver(s.t)
	secret := s.secret()
	recv.AddSecret(secret)
	recv.SetBehaviour(s.behaviour(recv))
	var id int64
	require.NoError(s.t, s.pool.QueryRow(context.Background(), `SELECT nextval(pg_get_serial_sequence('outboxd_subscription', 'id'))`).Scan(&id))
	sub := &soakSub{id: id, org: org, events: events, recv: recv}
	s.change(id, true, `INSERT INTO outboxd_subscription (id, organization_id, url, secrets, events) VALUES ($1, $2, $3, $4, $5)`,
		id, org, recv.URL(), []string{secret}, events)
	s.mu.Lock()
	s.subs = append(s.subs, sub)
	s.mu.Unlock()
	orgText := "platform-wide"
	if org != nil {
		orgText = fmt.Sprintf("organization %d", *org)
	}
	s.logOp("subscription %d added: %s, events %v", id, orgText, events)
	return sub
}

func (s *soak) opSubAdd() {
	s.mu.Lock()
	n := len(s.subs)
	s.mu.Unlock()
	if n >= 6 {
		s.opSubRotate()
		return
	}
	var org *int64
	if s.rng.IntN(4) > 0 {
		org = ptr(1 + s.rng.Int64N(soakOrgs))
	}
	s.addSub(org, soakGlobs[s.rng.IntN(len(soakGlobs))])
}

// enabledNow reports a subscription's latest recorded state.
func (s *soak) enabledNow(sub int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	on := false
	for _, c := range s.changes {
		if c.sub == sub {
			on = c.enabled
		}
	}
	return on
}

// pickSub returns a random subscription whose state is enabled (or not).
func (s *soak) pickSub(enabled bool) *soakSub {
	s.mu.Lock()
	subs := slices.Clone(s.subs)
	s.mu.Unlock()
	var cands []*soakSub
	for _, sub := range subs {
		if s.enabledNow(sub.id) == enabled {
			cands = append(cands, sub)
		}
	}
	if len(cands) == 0 {
		return nil
	}
	return cands[s.rng.IntN(len(cands))]
}

func (s *soak) opSubDisable() {
	sub := s.pickSub(true)
	if sub == nil {
		s.logOp("no enabled subscription to disable")
		return
	}
	s.change(sub.id, false, `UPDATE outboxd_subscription SET enabled = false, disabled_reason = 'soak', updated_at = now() WHERE id = $1`, sub.id)
	s.logOp("subscription %d disabled", sub.id)
}

func (s *soak) opSubEnable() {
	sub := s.pickSub(false)
	if sub == nil {
		s.logOp("no disabled subscription to enable")
		return
	}
	s.change(sub.id, true, `UPDATE outboxd_subscription SET enabled = true, disabled_reason = NULL, updated_at = now() WHERE id = $1`, sub.id)
	s.logOp("subscription %d enabled", sub.id)
}

// opSubRotate puts a new secret first and keeps the previous one, as
// `subscription rotate-secret` does: both sign until the old is dropped.
func (s *soak) opSubRotate() {
	s.mu.Lock()
	subs := slices.Clone(s.subs)
	s.mu.Unlock()
	sub := subs[s.rng.IntN(len(subs))]
	secret := s.secret()
	sub.recv.AddSecret(secret)
	s.change(sub.id, s.enabledNow(sub.id), `UPDATE outboxd_subscription SET secrets = ARRAY[$2]::text[] || secrets[1:1], updated_at = now() WHERE id = $1`, sub.id, secret)
	s.logOp("subscription %d secret rotated", sub.id)
}

func (s *soak) opReceiverFail() {
	s.mu.Lock()
	recvs := []*Receiver{s.recv}
	names := []string{"default webhook"}
	for _, sub := range s.subs {
		recvs = append(recvs, sub.recv)
		names = append(names, fmt.Sprintf("subscription %d", sub.id))
	}
	s.mu.Unlock()
	i := s.rng.IntN(len(recvs))
	s.fail(recvs[i], names[i], time.Duration(1000+s.rng.IntN(5000))*time.Millisecond)
}

// fail makes recv answer 503 for d.
func (s *soak) fail(recv *Receiver, name string, d time.Duration) {
	s.mu.Lock()
	s.failing[recv] = time.Now().Add(d)
	s.mu.Unlock()
	s.logOp("%s answers 503 for %s", name, d)
}

// live returns the daemons still running.
func (s *soak) live() []*daemon {
	s.rig.mu.Lock()
	defer s.rig.mu.Unlock()
	var out []*daemon
	for _, d := range s.daemons {
		if !d.Exited() {
			out = append(out, d)
		}
	}
	return out
}

var (
	leaderMarks  = []string{`"message":"streaming"`, `"message":"slot created"`, `"message":"slot and checkpoint reconciled"`}
	standbyMarks = []string{`"message":"waiting for the slot"`, "reconnecting", "database not reachable", "catch-up interrupted", "slot lost while streaming"}
)

func lastOf(log string, marks []string) int {
	at := -1
	for _, m := range marks {
		at = max(at, strings.LastIndex(log, m))
	}
	return at
}

// leader returns the instance whose log says it holds the slot (its last
// leader line comes after its last standby or reconnect line), or nil.
func (s *soak) leader() *daemon {
	for _, d := range s.live() {
		log := d.Log()
		if l := lastOf(log, leaderMarks); l >= 0 && l > lastOf(log, standbyMarks) {
			return d
		}
	}
	return nil
}

// waitLeader waits until some instance leads (bounded by progress of the
// instances' logs).
func (s *soak) waitLeader() *daemon {
	s.t.Helper()
	var d *daemon
	ok := untilProgress(2*time.Minute, func() int64 {
		n := 0
		for _, d := range s.live() {
			n += len(d.Log())
		}
		return int64(n)
	}, func() bool { d = s.leader(); return d != nil })
	require.True(s.t, ok, "no instance took the slot")
	return d
}

// topUp starts instances until three run.
func (s *soak) topUp() {
	for n := len(s.live()); n < 3; n++ {
		s.start(nil)
	}
}

func (s *soak) opKillLeader() {
	d := s.leader()
	if d == nil {
		s.logOp("kill -9: no leader found, killing a random instance")
		live := s.live()
		if len(live) == 0 {
			s.topUp()
			return
		}
		d = live[s.rng.IntN(len(live))]
	}
	d.kill()
	s.logOp("kill -9 of instance %d", d.PID())
	s.topUp()
}

func (s *soak) opSigterm() {
	live := s.live()
	if len(live) == 0 {
		s.topUp()
		return
	}
	d := live[s.rng.IntN(len(live))]
	code := d.stop()
	s.logOp("SIGTERM of instance %d: exit %d", d.PID(), code)
	require.Zero(s.t, code, "a SIGTERM ends outboxd with 0")
	s.topUp()
}

func (s *soak) opPostgresRestart() {
	down := time.Duration(200+s.rng.IntN(1800)) * time.Millisecond
	s.srv.Stop(s.t, "immediate")
	time.Sleep(down) //nolint:forbidigo // the outage's length is the fault
	s.startServer()
	s.logOp("postgres stopped (immediate) for %s and started", down)
}

func (s *soak) opCut() {
	rst := s.rng.IntN(2) == 0
	n := s.proxy.CloseAll(rst)
	s.logOp("cut %d connections (rst=%t)", n, rst)
}

func (s *soak) opSlotReset() {
	// The instance streaming from the slot is terminated; it finds the slot
	// gone and exits, and a standby creates the slot and catches up.
	leader := s.leader()
	code, out := e2e.RunCommand(s.t, s.envDirect, "slot", "reset", "--yes", "--force")
	s.logOp("slot reset --yes --force: exit %d: %s", code, shorten(strings.TrimSpace(out), 300))
	require.Zero(s.t, code, out)
	s.mu.Lock()
	s.resets = append(s.resets, s.gen.Len())
	if leader != nil {
		s.expectedExit[leader] = true
	} else {
		// The holder is not known (it was between two sessions): an exit
		// of any instance after the reset is expected.
		for _, d := range s.live() {
			s.expectedExit[d] = true
		}
	}
	s.mu.Unlock()
	s.waitLeader()
	s.topUp()
}

// checkExits fails on an instance that exited without an operation that
// ends it, and keeps three running.
func (s *soak) checkExits() {
	s.rig.mu.Lock()
	ds := slices.Clone(s.daemons)
	s.rig.mu.Unlock()
	for _, d := range ds {
		if !d.Exited() || d.killed() {
			continue
		}
		s.mu.Lock()
		ok := s.expectedExit[d]
		// The instance that held the slot at a reset may have been between
		// two sessions (a cut, a Postgres restart): it stops when it finds
		// the slot gone while its checkpoint is back (recreated by a
		// standby meanwhile) or confirmed beyond its own position, by
		// design (the reset's documented effect), whichever instance the
		// log-based guess took for the leader.
		ok = ok || len(s.resets) > 0 && (strings.Contains(d.Log(), "disappeared while streaming") ||
			strings.Contains(d.Log(), "it was reset or advanced by someone else"))
		s.mu.Unlock()
		if !ok {
			s.t.Fatalf("instance %d exited on its own; log tail:\n%s", d.PID(), tail(d.Log(), 4000))
		}
	}
	s.topUp()
}

// sample records every row processed now, with the moment after the query:
// from then on no copy of it may be sent.
func (s *soak) sample() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.mu.Lock()
	floor := s.floor
	s.mu.Unlock()
	// Rows below the floor were all processed, hence seen, at an earlier
	// sample; the margin covers rows of a transaction that was still open
	// then with smaller ids (the generator commits one at a time).
	rows, err := s.pool.Query(ctx, `SELECT id, is_processed IS TRUE FROM domain_event WHERE id >= $1`, floor-5000)
	if err != nil {
		return // Postgres restarting: the next sample will do
	}
	type st struct {
		ID        int64
		Processed bool
	}
	states, err := pgx.CollectRows(rows, pgx.RowToStructByPos[st])
	if err != nil {
		return
	}
	at := time.Now()
	s.mu.Lock()
	low := int64(-1)
	for _, r := range states {
		if !r.Processed {
			if low < 0 || r.ID < low {
				low = r.ID
			}
			continue
		}
		if _, ok := s.seen[r.ID]; !ok {
			s.seen[r.ID] = at
		}
	}
	if low >= 0 {
		s.floor = max(s.floor, low)
	}
	s.mu.Unlock()
}

func (s *soak) sampleEvery(d time.Duration) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(d)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				s.sample()
			}
		}
	}()
	return func() { cancel(); <-done }
}

// settleAll lifts every fault: receivers answer 2xx, every subscription is
// enabled, three instances run; then waits until every target has what it
// must have, every row is processed and no park remains.
func (s *soak) settleAll() {
	s.t.Helper()
	s.mu.Lock()
	clear(s.failing)
	subs := slices.Clone(s.subs)
	s.mu.Unlock()
	for _, sub := range subs {
		if !s.enabledNow(sub.id) {
			s.change(sub.id, true, `UPDATE outboxd_subscription SET enabled = true, disabled_reason = NULL, updated_at = now() WHERE id = $1`, sub.id)
			s.logOp("final: subscription %d enabled", sub.id)
		}
	}
	s.topUp()
	s.waitLeader()
	var remaining int64
	progress := func() int64 {
		n := int64(s.recv.AcceptedCount())
		for _, sub := range subs {
			n += int64(sub.recv.AcceptedCount())
		}
		return n*1000 - remaining
	}
	ok := untilProgress(3*time.Minute, progress, func() bool {
		s.checkExits()
		var unprocessed, parked int64
		if err := s.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM domain_event WHERE is_processed IS NOT TRUE),
 (SELECT count(*) FROM outboxd_parked)`).Scan(&unprocessed, &parked); err != nil {
			return false
		}
		remaining = unprocessed + parked
		return remaining == 0
	})
	if !ok {
		s.explainUnmarked(s.expectedIDs())
	}
	require.True(s.t, ok, "the soak did not settle: %d rows unprocessed or parked", remaining)
	s.sample()
}

// stateAt returns whether sub is enabled for a row at position pos (after pos
// rows were committed), and whether it existed then.
func (s *soak) stateAt(sub int64, pos int) (enabled, exists bool) {
	for _, c := range s.changes {
		if c.sub != sub || c.pos > pos {
			continue
		}
		enabled, exists = c.enabled, true
	}
	return enabled, exists
}

func (sub *soakSub) matches(row Row) bool {
	if sub.org != nil && *sub.org != row.Org {
		return false
	}
	return deliver.MatchGlobs(sub.events, row.Name)
}

// disabledBefore reports whether sub was disabled by a change committed
// after the row at pos and returned before seen (when the row was seen
// processed). If not, the subscription was enabled through every routing of
// the row (the stream's, or a catch-up's after a slot reset), so it had to
// acknowledge the row before the row was marked.
func (s *soak) disabledBefore(sub int64, pos int, seen time.Time) bool {
	for _, c := range s.changes {
		if c.sub == sub && c.pos > pos && !c.enabled && c.at.Before(seen) {
			return true
		}
	}
	return false
}

// targetResult is the soak's figures for one target.
type targetResult struct {
	name                       string
	required, received         int
	accepted                   int // distinct events accepted, required or not
	lost, outside, unsigned    int
	duplicates, outOfOrder     int
	redelivered, markedUnacked int
	badID                      int
}

func (s *soak) verify() {
	t := s.t
	t.Helper()
	rows := s.gen.Rows()
	pos := make(map[int64]int, len(rows))
	for i, row := range rows {
		pos[row.ID] = i
	}
	table := s.tableIDs()

	// Requests per event over every target, for delivery_attempts.
	requests := map[int64]int{}
	var results []targetResult
	judge := func(name string, recv *Receiver, required []int64, allowed func(id int64) bool, mustHaveBy func(id int64) bool) {
		ds := recv.Deliveries()
		c := check(required, rows, ds)
		if c.OutOfOrder > 0 {
			s.explainOrder(name, rows, ds)
		}
		res := targetResult{name: name, required: len(required), received: c.Delivered, lost: c.Lost,
			duplicates: c.Duplicates, outOfOrder: c.OutOfOrder, unsigned: c.BadSig, badID: c.BadID}
		accepted := map[int64][]time.Time{}
		for _, d := range ds {
			for _, id := range d.IDs {
				requests[id]++
				if !d.Accepted() {
					continue
				}
				accepted[id] = append(accepted[id], d.At)
				if at, ok := s.seen[id]; ok && !sentBefore(d, at) {
					res.redelivered++
					if res.redelivered == 1 {
						t.Logf("%s: event %d sent at %s after it was seen processed at %s", name, id,
							d.Start.Format("15:04:05.000"), at.Format("15:04:05.000"))
					}
				}
			}
		}
		for id := range accepted {
			if !allowed(id) {
				res.outside++
				if res.outside == 1 {
					t.Logf("%s: event %d is outside the subscription's window", name, id)
				}
			}
		}
		// A row seen processed must have been acknowledged by this target
		// before that moment when the target had to have it.
		for id, at := range s.seen {
			if !mustHaveBy(id) {
				continue
			}
			if !slices.ContainsFunc(accepted[id], func(a time.Time) bool { return a.Before(at) }) {
				res.markedUnacked++
				if res.markedUnacked == 1 {
					t.Logf("%s: event %d was processed at %s before this target acknowledged it", name, id, at.Format("15:04:05.000"))
				}
			}
		}
		res.accepted = len(accepted)
		// The event accepted most often, with when each copy came: what
		// tells a retry loop from the unconfirmed window at work.
		var most int64
		for id, ats := range accepted {
			if len(ats) > len(accepted[most]) {
				most = id
			}
		}
		if n := len(accepted[most]); n > 1 {
			var when []string
			for _, at := range accepted[most] {
				when = append(when, at.Format("15:04:05.000"))
			}
			seenAt := "never"
			if at, ok := s.seen[most]; ok {
				seenAt = at.Format("15:04:05.000")
			}
			t.Logf("%s: event %d accepted %d times, at %v; seen processed at %s", name, most, n, when, seenAt)
		}
		results = append(results, res)
	}

	judge("default webhook", s.recv, table, func(int64) bool { return true }, func(int64) bool { return true })
	for _, sub := range s.subs {
		var required []int64
		for _, id := range table {
			i, ok := pos[id]
			if !ok {
				continue // commit outcome unknown to the generator: its position is not known
			}
			seen, ok := s.seen[id]
			if !ok {
				seen = time.Now() // not processed: caught by the row check below
			}
			if on, _ := s.stateAt(sub.id, i); on && sub.matches(rows[i]) && !s.disabledBefore(sub.id, i, seen) {
				required = append(required, id)
			}
		}
		need := map[int64]bool{}
		for _, id := range required {
			need[id] = true
		}
		allowed := func(id int64) bool {
			i, ok := pos[id]
			if !ok {
				return true
			}
			if !sub.matches(rows[i]) {
				return false
			}
			// A catch-up routes by the subscriptions' history too (the
			// soak's server records commit timestamps): no row goes to a
			// subscription that did not match it at its commit.
			on, _ := s.stateAt(sub.id, i)
			return on
		}
		judge(fmt.Sprintf("subscription %d", sub.id), sub.recv, required, allowed, func(id int64) bool { return need[id] })
	}

	// Rows at the end: all processed, processed_at set, attempts between 1
	// and the requests seen.
	type rowState struct {
		ID        int64
		Processed *bool
		At        *time.Time
		Attempts  *int
	}
	rs, err := s.pool.Query(context.Background(), `SELECT id, is_processed, processed_at, delivery_attempts FROM domain_event`)
	require.NoError(t, err)
	states, err := pgx.CollectRows(rs, pgx.RowToStructByPos[rowState])
	require.NoError(t, err)
	untruthful := 0
	for _, st := range states {
		ok := st.Processed != nil && *st.Processed && st.At != nil && st.Attempts != nil &&
			*st.Attempts >= 1 && *st.Attempts <= requests[st.ID]
		if !ok {
			untruthful++
			if untruthful <= 3 {
				t.Logf("row %d: is_processed %v processed_at %v delivery_attempts %v, %d requests seen", st.ID, deref(st.Processed), st.At, deref(st.Attempts), requests[st.ID])
			}
		}
	}
	var dead int64
	require.NoError(t, s.pool.QueryRow(context.Background(), `SELECT count(*) FROM outboxd_dead_letter`).Scan(&dead))

	failed, unknown := s.gen.Failures()
	var b strings.Builder
	fmt.Fprintf(&b, "soak seed %d: %d operations (%s), %d rows committed (%d transactions failed, %d with unknown outcome), %d slot resets\n",
		s.seed, s.opTotal(), s.opCounts(), len(table), failed, unknown, len(s.resets))
	b.WriteString("| target | accepted | must have | of those received | lost | outside window | unsigned | duplicates | sent after processed | processed before ack | out of order | bad webhook-id |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, res := range results {
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d | %d |\n", res.name, res.accepted, res.required, res.received, res.lost,
			res.outside, res.unsigned, res.duplicates, res.redelivered, res.markedUnacked, res.outOfOrder, res.badID)
	}
	fmt.Fprintf(&b, "rows not truthful at the end: %d; dead letters: %d\n", untruthful, dead)
	t.Log("\n" + b.String())
	if path := os.Getenv("OUTBOXD_SOAK_REPORT"); path != "" {
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			_, _ = f.WriteString(b.String() + "\n")
			_ = f.Close()
		}
	}

	for _, res := range results {
		require.Zero(t, res.lost, "%s: lost events", res.name)
		require.Zero(t, res.outside, "%s: events outside the subscription's window", res.name)
		require.Zero(t, res.unsigned, "%s: requests not signed with a secret of the target", res.name)
		require.Zero(t, res.redelivered, "%s: copies sent after the row was processed (outside the unconfirmed window)", res.name)
		require.Zero(t, res.markedUnacked, "%s: rows processed before this target acknowledged them", res.name)
		require.Zero(t, res.outOfOrder, "%s: first receipts out of commit order within an organization", res.name)
		require.Zero(t, res.badID, "%s: bad webhook-ids", res.name)
	}
	require.Zero(t, untruthful, "rows not truthful at the end")
	require.Zero(t, dead, "dead letters")
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

func (s *soak) opTotal() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, v := range s.ops {
		n += v
	}
	return n
}

func (s *soak) opCounts() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.ops))
	for n := range s.ops {
		names = append(names, n)
	}
	slices.Sort(names)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s %d", n, s.ops[n])
	}
	return strings.Join(parts, ", ")
}

// killed reports whether the test ended the process (kill or stop).
func (d *daemon) killed() bool {
	return d.ended.Load()
}

// explainOrder logs, for the first few pairs of one organization received
// out of commit order by a target, each event's commit position and commit
// time, every copy it got (time, status, attempt) and when it was seen
// processed, with the operations around: what tells a routing or parking
// defect from a judge's mistake.
func (s *soak) explainOrder(name string, rows []Row, ds []Delivery) {
	first := map[int64]int{}
	copies := map[int64][]string{}
	for i, d := range ds {
		for _, id := range d.IDs {
			copies[id] = append(copies[id], fmt.Sprintf("%s/%d/a%d", d.At.Format("15:04:05.000"), d.Status, d.Attempt))
			if _, ok := first[id]; !ok && d.Accepted() {
				first[id] = i
			}
		}
	}
	last := map[int64]Row{} // per organization, the latest row in commit order received so far
	lastPos := map[int64]int{}
	shown := 0
	for i, r := range rows {
		p, ok := first[r.ID]
		if !ok {
			continue
		}
		if prev, seen := last[r.Org]; seen && first[prev.ID] > p && shown < 5 {
			shown++
			s.t.Logf("%s: org %d: event %d (commit #%d at %s, %s) received before event %d (commit #%d at %s, %s); copies of %d: %v; of %d: %v; seen processed %s / %s",
				name, r.Org, r.ID, i, r.At.Format("15:04:05.000"), r.Name, prev.ID, lastPos[r.Org], prev.At.Format("15:04:05.000"), prev.Name,
				prev.ID, copies[prev.ID], r.ID, copies[r.ID], s.seen[prev.ID].Format("15:04:05.000"), s.seen[r.ID].Format("15:04:05.000"))
		}
		if prev, seen := last[r.Org]; !seen || first[prev.ID] < p {
			last[r.Org], lastPos[r.Org] = r, i
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t.Logf("operations of the run:\n%s", strings.Join(s.oplog, "\n"))
}
