package sink_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/sink"
	"github.com/outboxd/outboxd/sink/sinktest"
)

// TestWebhookConformance runs the shared sink suite against the webhook sink,
// with an httptest server as the adapter between HTTP and sinktest.Receiver.
func TestWebhookConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T, rcv *sinktest.Receiver) sink.Sink {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			ids, err := sinktest.IDsFromJSON(body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			switch rcv.Receive(r.Context(), ids) {
			case sinktest.Ack:
				w.WriteHeader(http.StatusOK)
			case sinktest.FailPermanent:
				w.WriteHeader(http.StatusUnprocessableEntity)
			default:
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		}))
		t.Cleanup(srv.Close)
		w, err := sink.NewWebhook(sink.WebhookConfig{
			Name:    "conformance",
			URL:     srv.URL,
			Secrets: []string{secretA},
			HTTPConfig: sink.HTTPConfig{
				AllowPrivate: true,
				RetryConfig:  sink.RetryConfig{MaxAttempts: 4, BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond},
			},
		}, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(w.Close)
		return w
	})
}
