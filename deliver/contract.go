package deliver

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/plan"
	"github.com/outboxd/outboxd/store"
)

// ContractPolicy is what a target does with an event that breaks the
// tracking plan (README "Tracking plan").
type ContractPolicy string

// Contract policies.
const (
	// ContractDeliver delivers it like any event (the default).
	ContractDeliver ContractPolicy = "deliver"
	// ContractSkip settles it for the target without sending it.
	ContractSkip ContractPolicy = "skip"
	// ContractDeadLetter dead-letters it for the target without sending
	// it, the reason starting with ContractReasonPrefix.
	ContractDeadLetter ContractPolicy = "dead-letter"
)

// ContractReasonPrefix starts the reason of a dead letter of an event that
// broke the tracking plan.
const ContractReasonPrefix = "contract: "

// ParseContractPolicy validates a policy name; "" is ContractDeliver.
func ParseContractPolicy(s string) (ContractPolicy, error) {
	switch p := ContractPolicy(s); p {
	case "":
		return ContractDeliver, nil
	case ContractDeliver, ContractSkip, ContractDeadLetter:
		return p, nil
	}
	return "", fmt.Errorf("unknown contract policy %q (want deliver, skip or dead-letter)", s)
}

// ContractConfig is what the router does with the tracking plan. With no
// plan stored, validation is off and every event is delivered.
type ContractConfig struct {
	// Default is the policy of a destination not in Targets (deliver when
	// empty).
	Default ContractPolicy
	// Targets are the policies of the process's own destinations, by name.
	Targets map[string]ContractPolicy
	// Subscriptions is the policy of every webhook subscription (deliver
	// when empty).
	Subscriptions ContractPolicy
	// Load reads the plan stored now (ok false: none). The router calls it
	// at start only when the routing state it resumes from has no plan (a
	// first start, or state written by an earlier version); may be nil.
	Load func() (source []byte, sha string, ok bool, err error)
	// OnCheck is told each validated event's verdict and the time the
	// validation took (metrics); may be nil.
	OnCheck func(v plan.Verdict, took time.Duration)
	// OnSettled is told each target an invalid event was settled for
	// without being sent (target: the destination's name, or
	// "subscription"; policy skip or dead-letter); may be nil.
	OnSettled func(target string, policy ContractPolicy)
}

// policy returns the policy of a destination.
func (c ContractConfig) policy(target string) ContractPolicy {
	if p, ok := c.Targets[target]; ok && p != "" {
		return p
	}
	if c.Default == "" {
		return ContractDeliver
	}
	return c.Default
}

// contractPolicy returns s's own policy, or def when it has none (or one
// this version does not know: the column's CHECK allows only the three).
func (s *Subscription) contractPolicy(def ContractPolicy) ContractPolicy {
	if s.Contract == "" {
		return def
	}
	if p, err := ParseContractPolicy(s.Contract); err == nil {
		return p
	}
	return def
}

func (c ContractConfig) subscriptionPolicy() ContractPolicy {
	if c.Subscriptions == "" {
		return ContractDeliver
	}
	return c.Subscriptions
}

// contract is the tracking plan as of the router's position in the stream.
type contract struct {
	// known is false until the router knows the plan at its position (from
	// the routing state, Load or a change of the plan table); only then is
	// the plan part of the routing state it writes.
	known  bool
	source string
	sha    string
	v      *plan.Validator // nil: no plan, validation off
}

// planState is the plan's part of the routing state.
type planState struct {
	SHA256 string `json:"sha256"`
	Source string `json:"source"`
}

// routingState is the routing state kept with the checkpoint once the plan
// is known: the registry's snapshot (a JSON array, alone in the state of
// earlier versions) and the plan (null: none stored).
type routingState struct {
	Subscriptions json.RawMessage `json:"subscriptions"`
	Plan          *planState      `json:"plan"`
}

// splitRouting reads a routing state: the registry's snapshot, and the plan
// when the state has it.
func splitRouting(state []byte) (subs []byte, p *planState, known bool, err error) {
	var probe any
	if len(state) == 0 || json.Unmarshal(state, &probe) != nil {
		return state, nil, false, nil // NewRegistry reports a malformed state
	}
	if _, isObject := probe.(map[string]any); !isObject {
		return state, nil, false, nil
	}
	var rs routingState
	if err := json.Unmarshal(state, &rs); err != nil {
		return nil, nil, false, fmt.Errorf("read routing state: %w", err)
	}
	return rs.Subscriptions, rs.Plan, true, nil
}

// set makes source the plan; an empty source removes it. A plan that does
// not parse (edited by hand in the table) is an error, and the previous plan
// stays.
func (c *contract) set(source, sha string) error {
	c.known = true
	if source == "" {
		c.source, c.sha, c.v = "", "", nil
		return nil
	}
	p, err := plan.Parse("outboxd_plan", []byte(source))
	if err != nil {
		return fmt.Errorf("the stored tracking plan does not parse; the previous one stays in force: %w", err)
	}
	c.source, c.sha, c.v = source, sha, plan.NewValidator(p, sha)
	return nil
}

// state returns the plan's part of the routing state.
func (c *contract) state() *planState {
	if c.v == nil {
		return nil
	}
	return &planState{SHA256: c.sha, Source: c.source}
}

// isPlanChange reports whether ch is a change of the plan table.
func isPlanChange(ch *decode.Change) bool {
	return ch.Row != nil && ch.Row.Relation != nil && ch.Row.Relation.Name == planTable
}

// planTable is the tracking plan's table (migrations.PlanTable).
const planTable = "outboxd_plan"

// applyPlan applies a change of the plan table: an insert or update sets
// the plan from its source column (one that pgoutput left unchanged keeps
// the plan), a delete removes it.
func (r *Router) applyPlan(ch *decode.Change) error {
	if ch.Kind == decode.KindDelete {
		r.log.Info().Msg("tracking plan removed: events are no longer validated")
		return r.contract.set("", "")
	}
	var source, sha string
	for i, col := range ch.Row.Relation.Columns {
		switch col.Name {
		case "source":
			if ch.Row.IsUnchanged(i) {
				r.contract.known = true
				return nil // the same plan
			}
			source = string(ch.Row.Values[i])
		case "source_sha256":
			sha = string(ch.Row.Values[i])
		}
	}
	if source == "" {
		return errors.New("a change of the tracking plan without its source")
	}
	if err := r.contract.set(source, sha); err != nil {
		return err
	}
	r.log.Info().Str("sha256", sha).Int("events", len(r.contract.v.Plan().Events)).Msg("tracking plan in force from this commit")
	return nil
}

// snapshot returns the routing state: the registry's snapshot, with the
// plan once it is known.
func (r *Router) snapshot() []byte {
	if !r.contract.known {
		return r.reg.Snapshot()
	}
	// routingState as json.Marshal writes it, the registry's snapshot
	// (compact already) written once, in place.
	plan, _ := json.Marshal(r.contract.state()) // plain data: cannot fail
	b := r.reg.AppendSnapshot([]byte(`{"subscriptions":`))
	b = append(append(b, `,"plan":`...), plan...)
	return append(b, '}')
}

// loadContract sets the plan from the routing state, or from the table
// when the state has none.
func (r *Router) loadContract(p *planState, known bool) error {
	if known {
		if p == nil {
			return r.contract.set("", "")
		}
		return r.contract.set(p.Source, p.SHA256)
	}
	if r.cfg.Contract.Load == nil {
		return nil
	}
	source, sha, ok, err := r.cfg.Contract.Load()
	if err != nil {
		return fmt.Errorf("read the tracking plan: %w", err)
	}
	if !ok {
		return r.contract.set("", "")
	}
	return r.contract.set(string(source), sha)
}

// check validates e against the plan in force; ok false when there is
// none.
func (r *Router) check(e *decode.Event) (v plan.Verdict, ok bool) {
	if r.contract.v == nil {
		return v, false
	}
	start := time.Now()
	v = r.contract.v.Check(e.Body)
	if r.cfg.Contract.OnCheck != nil {
		r.cfg.Contract.OnCheck(v, time.Since(start))
	}
	return v, true
}

// contractSettled is a target an invalid event is settled for without
// being sent.
type contractSettled struct {
	target, label string
	policy        ContractPolicy
}

// settleContract settles dl for the targets of held, which do not send it:
// skipped, or dead-lettered with the verdict's reason. Called before dl is
// handed to any other target, so it settles the event only when no other
// target has it.
func (r *Router) settleContract(dl *Delivery, held []contractSettled, v plan.Verdict) error {
	for _, h := range held {
		var dead *store.DeadLetter
		if h.policy == ContractDeadLetter {
			dead = &store.DeadLetter{EventID: dl.Event.ID, Sink: h.target, Reason: ContractReasonPrefix + v.Reason}
			r.keep(h.target)
		}
		if r.cfg.Contract.OnSettled != nil {
			r.cfg.Contract.OnSettled(h.label, h.policy)
		}
		if s, last := dl.settledBy(0, dead, nil); last {
			if err := r.settler.Settle(dl.Event.TxnSeq, s); err != nil {
				return err
			}
		}
	}
	return nil
}
