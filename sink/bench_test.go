package sink_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

func BenchmarkWebhookDeliver(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusNoContent)
	}))
	b.Cleanup(srv.Close)
	cfg := fastConfig(srv.URL)
	cfg.Secrets = []string{secretA}
	w := newWebhook(b, cfg, zerolog.Nop())

	for _, bc := range []struct {
		name  string
		batch int
	}{{"single", 1}, {"batch10", 10}} {
		evs := make([]*decode.Event, bc.batch)
		for i := range evs {
			evs[i] = event(int64(1000 + i))
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if out := w.Deliver(b.Context(), evs); out[0].Err != nil {
					b.Fatal(out[0].Err)
				}
			}
		})
		// As deliver's dispatcher makes its calls: each on a goroutine of
		// its own, which starts with a small stack.
		b.Run(bc.name+"/goroutine", func(b *testing.B) {
			b.ReportAllocs()
			done := make(chan error)
			for b.Loop() {
				go func() { done <- w.Deliver(b.Context(), evs)[0].Err }()
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(bc.name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if out := w.Deliver(b.Context(), evs); out[0].Err != nil {
						b.Error(out[0].Err)
						return
					}
				}
			})
		})
	}
}

func BenchmarkSign(b *testing.B) {
	body := event(123456).Body
	for _, bc := range []struct {
		name    string
		secrets []string
	}{{"one", []string{secretA}}, {"two", []string{secretA, secretB}}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				if _, err := sink.Sign(bc.secrets, "123456", 1764151200, body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
