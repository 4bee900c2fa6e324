package deliver

import (
	"syscall"
	"testing"
	"time"

	"github.com/outboxd/outboxd/sink"
)

// BenchmarkFilterAndMask measures what a destination with a property filter
// and a mask costs per event: parsing the envelope for the filter, running
// the filter, and masking a copy of the body (drop, hash, redact). Sub-
// benchmarks give each part alone. Besides wall time per op they report
// cpu-ns/op, the process's CPU time (user + system, GC included) per op,
// which a machine shared with other work inflates far less. Run:
//
//	go test -run '^$' -bench BenchmarkFilterAndMask -benchmem -cpu 1 ./deliver
func BenchmarkFilterAndMask(b *testing.B) {
	e := bodyEvent(1, "inventory_adjusted",
		`{"delta":-2,"sku":"S-1","warehouse":"W1","email":"ann@example.com","customer":{"email":"Ann@Example.com","tier":"gold"},"note":"call after 6","lines":[1,2,3]}`)
	f, err := CompileFilter(`event_name == "inventory_adjusted" && properties.delta < 0`)
	if err != nil {
		b.Fatal(err)
	}
	m, err := sink.ParseMask("drop:properties.email,hash:properties.customer.email,redact:properties.note", []byte("0123456789abcdef-bench"))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("filter", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if ok, err := f.Match(NewEventEnv(e)); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("mask", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if _, err := m.Apply(e.Body); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("filter+mask", func(b *testing.B) {
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if ok, err := f.Match(NewEventEnv(e)); !ok || err != nil {
				b.Fatal(ok, err)
			}
			if _, err := m.Apply(e.Body); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("no-filter", func(b *testing.B) {
		// A destination without a filter: the router does not parse.
		var none *Filter
		b.ReportAllocs()
		defer cpuPerOp(b)()
		for b.Loop() {
			if ok, _ := none.Match(nil); !ok {
				b.Fatal("nil filter")
			}
		}
	})
}

// cpuPerOp starts measuring the process's CPU time; the function it returns
// reports it per op as cpu-ns/op.
func cpuPerOp(b *testing.B) func() {
	start := cpuTime()
	return func() { b.ReportMetric(float64((cpuTime()-start).Nanoseconds())/float64(b.N), "cpu-ns/op") }
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
