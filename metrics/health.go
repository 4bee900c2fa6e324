package metrics

import (
	"encoding/json"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves the operator endpoints:
//
//   - /metrics: the Prometheus metrics of m.
//   - /healthz: 200 while the process runs; no database involved (liveness).
//   - /readyz: 200 when the configuration is valid (it was, or outboxd would
//     not be running) and the database answers a ping within PingTimeout;
//     503 otherwise. A standby is ready too: taking a sidecar's application
//     out of service because another instance holds the slot would be wrong.
//   - /health/replication: 200 when the slot is healthy, 503 when it is
//     missing, stalled, lagging beyond LagAlertBytes or its WAL is
//     unreserved or lost; a JSON body says why (for alerting, not for
//     readiness).
func Handler(m *Metrics, mon *Monitor) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry(), promhttp.HandlerOpts{
		Registry:          m.Registry(), // counts scrape errors as promhttp_metric_handler_errors_total
		EnableOpenMetrics: true,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		role := "standby"
		if m.Leader() {
			role = "leader"
		}
		if err := mon.Ready(r.Context()); err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "reason": err.Error(), "role": role})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready", "role": role})
	})
	mux.HandleFunc("GET /health/replication", func(w http.ResponseWriter, _ *http.Request) {
		h := mon.Replication()
		code := http.StatusOK
		if !h.Healthy {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, h)
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client may be gone
}
