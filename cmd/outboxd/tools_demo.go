package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// demoEvent is one row the demo inserts into domain_event.
type demoEvent struct {
	Name        string
	Org         int64
	User        *int64
	EntityType  string
	EntityID    string
	Correlation string
	Source      string
	Props       map[string]any
}

// demoItem is something an organization makes: recipe, product and SKU.
type demoItem struct {
	Recipe, RecipeName string
	Product, Name      string
	Category           string
	SKU                string
	PackSize           int
	PriceCents         int
	Units              int      // planned units per batch
	Ingredients        []string // consumed per batch
	Steps              []string // timed production steps
	Line               string
}

// demoOrg is one organization of the demo and where its current batch is.
type demoOrg struct {
	ID      int64
	Name    string
	Users   []int64
	Catalog []demoItem
	known   int // catalog items announced so far
	onHand  map[string]int

	batch     string
	item      demoItem
	step      int // index into the batch's story
	timer     string
	stepName  string
	produced  int
	startedAt time.Time
}

// demoWorld produces the demo's transactions: each organization runs
// production batches one after the other (batch_started, timer_started,
// timer_stopped with the ingredients it consumed, batch_completed with the
// units produced, batch_metrics_computed), announces new catalog items now
// and then (recipe_created, product_created, sku_created) and sells from
// stock (inventory_adjusted). Several events of one business step are one
// transaction, as an application would write them.
type demoWorld struct {
	rng       *rand.Rand
	orgs      []*demoOrg
	nextBatch int
	nextTimer int
	now       func() time.Time
}

func newDemoWorld(seed uint64) *demoWorld {
	w := &demoWorld{rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), nextBatch: 1001, nextTimer: 501, now: time.Now}
	w.orgs = []*demoOrg{
		{ID: 7, Name: "Hilltop Bakery", Users: []int64{3, 4, 9}, Catalog: []demoItem{
			{Recipe: "R-101", RecipeName: "Country sourdough", Product: "P-201", Name: "Sourdough loaf 800 g", Category: "bread",
				SKU: "SKU-SD-800", PackSize: 1, PriceCents: 650, Units: 120, Ingredients: []string{"flour_t65", "water", "salt", "levain"},
				Steps: []string{"bulk_ferment", "proof", "bake"}, Line: "oven-2"},
			{Recipe: "R-102", RecipeName: "Butter croissant", Product: "P-202", Name: "Croissant (box of 6)", Category: "viennoiserie",
				SKU: "SKU-CR-6", PackSize: 6, PriceCents: 980, Units: 60, Ingredients: []string{"flour_t45", "butter", "sugar", "yeast"},
				Steps: []string{"laminate", "proof", "bake"}, Line: "oven-1"},
		}},
		{ID: 12, Name: "Northside Brewing", Users: []int64{21, 22}, Catalog: []demoItem{
			{Recipe: "R-310", RecipeName: "West Coast IPA", Product: "P-410", Name: "IPA 440 ml can", Category: "beer",
				SKU: "SKU-IPA-440", PackSize: 4, PriceCents: 1299, Units: 800, Ingredients: []string{"pale_malt", "hops_citra", "yeast_us05"},
				Steps: []string{"mash", "boil", "ferment"}, Line: "brewhouse-1"},
			{Recipe: "R-311", RecipeName: "Oat stout", Product: "P-411", Name: "Stout 330 ml bottle", Category: "beer",
				SKU: "SKU-ST-330", PackSize: 6, PriceCents: 1450, Units: 600, Ingredients: []string{"pale_malt", "roasted_barley", "oats"},
				Steps: []string{"mash", "boil", "ferment"}, Line: "brewhouse-1"},
		}},
		{ID: 31, Name: "Coastal Soap Co.", Users: []int64{40}, Catalog: []demoItem{
			{Recipe: "R-501", RecipeName: "Lavender cold-process soap", Product: "P-601", Name: "Lavender bar 100 g", Category: "soap",
				SKU: "SKU-LAV-100", PackSize: 1, PriceCents: 700, Units: 48, Ingredients: []string{"olive_oil", "coconut_oil", "lye", "lavender_oil"},
				Steps: []string{"trace", "pour"}, Line: "bench-A"},
		}},
	}
	for _, o := range w.orgs {
		o.onHand = map[string]int{}
	}
	return w
}

func (w *demoWorld) user(o *demoOrg) *int64 {
	u := o.Users[w.rng.IntN(len(o.Users))]
	return &u
}

// announce is the transaction that adds catalog item i of o.
func (w *demoWorld) announce(o *demoOrg, it demoItem) []demoEvent {
	u := w.user(o)
	corr := "cat-" + it.Product
	ingredients := make([]map[string]any, 0, len(it.Ingredients))
	for _, ing := range it.Ingredients {
		ingredients = append(ingredients, map[string]any{"item": ing, "qty": 1 + w.rng.IntN(20), "unit": "kg"})
	}
	return []demoEvent{
		{Name: "recipe_created", Org: o.ID, User: u, EntityType: "recipe", EntityID: it.Recipe, Correlation: corr, Source: "catalog_service",
			Props: map[string]any{"recipe_id": it.Recipe, "name": it.RecipeName, "yield_units": it.Units, "ingredients": ingredients}},
		{Name: "product_created", Org: o.ID, User: u, EntityType: "product", EntityID: it.Product, Correlation: corr, Source: "catalog_service",
			Props: map[string]any{"product_id": it.Product, "name": it.Name, "recipe_id": it.Recipe, "category": it.Category}},
		{Name: "sku_created", Org: o.ID, User: u, EntityType: "sku", EntityID: it.SKU, Correlation: corr, Source: "catalog_service",
			Props: map[string]any{"sku": it.SKU, "product_id": it.Product, "pack_size": it.PackSize, "price_cents": it.PriceCents, "currency": "EUR"}},
	}
}

// opening is the first transactions: every organization's first catalog item.
func (w *demoWorld) opening() [][]demoEvent {
	var txs [][]demoEvent
	for _, o := range w.orgs {
		txs = append(txs, w.announce(o, o.Catalog[0]))
		o.known = 1
	}
	return txs
}

// next returns the next transaction of a randomly chosen organization.
func (w *demoWorld) next() []demoEvent {
	o := w.orgs[w.rng.IntN(len(w.orgs))]
	if o.known < len(o.Catalog) && w.rng.IntN(12) == 0 {
		it := o.Catalog[o.known]
		o.known++
		return w.announce(o, it)
	}
	if o.batch != "" && o.step > 0 && w.rng.IntN(6) == 0 && o.onHand[o.item.SKU] > 0 {
		return []demoEvent{w.sale(o)}
	}
	return w.advance(o)
}

func (w *demoWorld) sale(o *demoOrg) demoEvent {
	sku := o.item.SKU
	n := min(o.onHand[sku], 1+w.rng.IntN(12))
	o.onHand[sku] -= n
	return demoEvent{Name: "inventory_adjusted", Org: o.ID, User: w.user(o), EntityType: "sku", EntityID: sku,
		Correlation: fmt.Sprintf("order-%d", 50000+w.rng.IntN(50000)), Source: "inventory_service",
		Props: map[string]any{"sku": sku, "delta": -n, "reason": "sale", "on_hand": o.onHand[sku]}}
}

// advance moves o's current batch one step along its story.
func (w *demoWorld) advance(o *demoOrg) []demoEvent {
	u := w.user(o)
	if o.batch == "" {
		o.item = o.Catalog[w.rng.IntN(o.known)]
		o.batch = fmt.Sprintf("B-%d", w.nextBatch)
		w.nextBatch++
		o.step, o.startedAt = 0, w.now()
	}
	it, b := o.item, o.batch
	ev := func(name, etype, eid, source string, props map[string]any) demoEvent {
		return demoEvent{Name: name, Org: o.ID, User: u, EntityType: etype, EntityID: eid, Correlation: "batch-" + b, Source: source, Props: props}
	}
	// The story: start, then (timer start, timer stop) per production step,
	// then completion and metrics.
	timed := 2 * len(it.Steps)
	step := o.step
	o.step++
	switch {
	case step == 0:
		return []demoEvent{ev("batch_started", "batch", b, "production_service",
			map[string]any{"batch_id": b, "recipe_id": it.Recipe, "sku": it.SKU, "planned_units": it.Units, "line": it.Line})}
	case step <= timed && step%2 == 1:
		o.timer = fmt.Sprintf("T-%d", w.nextTimer)
		w.nextTimer++
		o.stepName = it.Steps[(step-1)/2]
		return []demoEvent{ev("timer_started", "timer", o.timer, "timer_service",
			map[string]any{"timer_id": o.timer, "batch_id": b, "step": o.stepName, "planned_minutes": 15 + 5*w.rng.IntN(30)})}
	case step <= timed:
		out := []demoEvent{ev("timer_stopped", "timer", o.timer, "timer_service",
			map[string]any{"timer_id": o.timer, "batch_id": b, "step": o.stepName, "elapsed_seconds": 600 + w.rng.IntN(3600)})}
		if step == 2 { // the first step consumes the ingredients
			for _, ing := range it.Ingredients {
				qty := 1 + w.rng.IntN(40)
				o.onHand[ing] -= qty
				out = append(out, ev("inventory_adjusted", "ingredient", ing, "inventory_service",
					map[string]any{"item": ing, "delta": -qty, "unit": "kg", "reason": "consumed_by_batch", "batch_id": b}))
			}
		}
		return out
	case step == timed+1:
		o.produced = it.Units - w.rng.IntN(it.Units/10+1)
		o.onHand[it.SKU] += o.produced
		minutes := int(w.now().Sub(o.startedAt).Minutes()) + 45 + w.rng.IntN(240)
		return []demoEvent{
			ev("batch_completed", "batch", b, "production_service",
				map[string]any{"batch_id": b, "sku": it.SKU, "produced_units": o.produced, "planned_units": it.Units, "duration_minutes": minutes}),
			ev("inventory_adjusted", "sku", it.SKU, "inventory_service",
				map[string]any{"sku": it.SKU, "delta": o.produced, "reason": "produced", "batch_id": b, "on_hand": o.onHand[it.SKU]}),
		}
	default:
		yield := float64(o.produced) / float64(it.Units) * 100
		metrics := ev("batch_metrics_computed", "batch", b, "analytics_service",
			map[string]any{"batch_id": b, "yield_pct": float64(int(yield*10)) / 10, "waste_units": it.Units - o.produced,
				"cost_per_unit_cents": it.PriceCents/3 + w.rng.IntN(50), "labour_minutes": 30 + w.rng.IntN(180)})
		metrics.User = nil // computed by a job, not a person
		o.batch = ""
		return []demoEvent{metrics}
	}
}

// insertDemo writes one transaction of demo events.
func insertDemo(ctx context.Context, pool *pgxpool.Pool, events []demoEvent) error {
	return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		for _, e := range events {
			props, err := json.Marshal(e.Props)
			if err != nil {
				return fmt.Errorf("encode properties of %s: %w", e.Name, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO domain_event
  (event_name, organization_id, user_id, entity_type, entity_id, correlation_id, source, properties)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
				e.Name, e.Org, e.User, e.EntityType, e.EntityID, e.Correlation, e.Source, string(props)); err != nil {
				return fmt.Errorf("insert %s: %w", e.Name, err)
			}
		}
		return nil
	})
}

// runDemo inserts the opening transactions at once, then one transaction
// about every interval (a few events per second) until ctx ends.
func runDemo(ctx context.Context, pool *pgxpool.Pool, interval time.Duration) error {
	w := newDemoWorld(uint64(time.Now().UnixNano()))
	for _, tx := range w.opening() {
		if err := insertDemo(ctx, pool, tx); err != nil {
			return demoErr(ctx, err)
		}
	}
	for {
		if err := insertDemo(ctx, pool, w.next()); err != nil {
			return demoErr(ctx, err)
		}
		jitter := time.Duration(w.rng.Int64N(int64(interval))) - interval/2
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval + jitter):
		}
	}
}

func demoErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil // stopping
	}
	return fmt.Errorf("demo: %w", err)
}
