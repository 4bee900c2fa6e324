package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/outboxd/outboxd/sink"
)

// maxReceiveBody bounds a request body the receivers read: far above any
// batch outboxd sends, small enough that a stray client cannot exhaust memory.
const maxReceiveBody = 64 << 20

// hookVerifier checks Standard Webhooks signatures: webhook-id,
// webhook-timestamp within the tolerance of the local clock, and at least
// one "v1,<base64>" entry of webhook-signature that equals the HMAC-SHA256
// of "<id>.<timestamp>.<body>" under one of the secrets. The expected
// signatures come from sink.Sign, the function outboxd signs with; they are
// compared in constant time.
type hookVerifier struct {
	secrets   []string
	tolerance time.Duration
	now       func() time.Time
}

// newHookVerifier checks the secrets (whsec_ + base64) and the tolerance. Its
// errors name a secret by position only.
func newHookVerifier(secrets []string, tolerance time.Duration) (*hookVerifier, error) {
	if len(secrets) == 0 {
		return nil, errors.New("no secret")
	}
	if _, err := sink.Sign(secrets, "check", 0, nil); err != nil {
		return nil, err
	}
	if tolerance <= 0 {
		return nil, fmt.Errorf("tolerance must be positive, got %s", tolerance)
	}
	return &hookVerifier{secrets: secrets, tolerance: tolerance, now: time.Now}, nil
}

// verify returns "" when the request is validly signed, else the reason it
// is not. The reason never contains a secret or a signature.
func (v *hookVerifier) verify(h http.Header, body []byte) string {
	id, ts, sig := h.Get("webhook-id"), h.Get("webhook-timestamp"), h.Get("webhook-signature")
	var missing []string
	for _, f := range []struct{ name, value string }{{"webhook-id", id}, {"webhook-timestamp", ts}, {"webhook-signature", sig}} {
		if f.value == "" {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return "missing header " + strings.Join(missing, ", ")
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return "webhook-timestamp is not unix seconds"
	}
	skew := v.now().Sub(time.Unix(unix, 0))
	if skew > v.tolerance || -skew > v.tolerance {
		return fmt.Sprintf("webhook-timestamp %s off the local clock (tolerance %s)", skew.Round(time.Second), v.tolerance)
	}
	want, err := sink.Sign(v.secrets, id, unix, body)
	if err != nil {
		return "cannot compute the signature" // secrets were checked by newHookVerifier
	}
	var expected [][]byte
	for _, entry := range strings.Fields(want) {
		raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(entry, "v1,"))
		if err == nil {
			expected = append(expected, raw)
		}
	}
	for _, entry := range strings.Fields(sig) {
		version, b64, ok := strings.Cut(entry, ",")
		if !ok || version != "v1" {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			continue
		}
		for _, e := range expected {
			if hmac.Equal(got, e) {
				return ""
			}
		}
	}
	return "no v1 signature matches"
}

// hookStatusScript answers scripted status codes: one per request, the last one
// repeating.
type hookStatusScript struct {
	mu    sync.Mutex
	codes []int
	next  int
}

// parseHookStatusScript parses "503,503,200".
func parseHookStatusScript(s string) ([]int, error) {
	var codes []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		code, err := strconv.Atoi(f)
		if err != nil || code < 200 || code > 599 {
			return nil, fmt.Errorf("%q is not an HTTP status code between 200 and 599", f)
		}
		codes = append(codes, code)
	}
	return codes, nil
}

func (s *hookStatusScript) take() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	code := s.codes[s.next]
	if s.next < len(s.codes)-1 {
		s.next++
	}
	return code
}

// hookRequest is one request a receiver got.
type hookRequest struct {
	At          time.Time
	WebhookID   string
	Timestamp   string
	Valid       *bool  // nil when signatures are not checked
	Problem     string // why the signature is invalid
	Status      int    // the answer
	Replay      bool
	Traceparent string
	Body        []byte
}

// webhookReceiver is the HTTP handler of `outboxd receive` and of the
// receiver `outboxd dev` runs: it verifies, decides the answer and records
// the request before answering, so that a sender never hears 2xx for a
// request that was not printed or written.
type webhookReceiver struct {
	verify *hookVerifier // nil: signatures are not checked
	status func() int
	// record prints or writes d; an error answers 500 (the sender retries).
	record func(d *hookRequest) error
}

func (rc *webhookReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxReceiveBody))
	if err != nil {
		http.Error(w, "cannot read body", http.StatusRequestEntityTooLarge)
		return
	}
	d := &hookRequest{
		At: time.Now(), WebhookID: r.Header.Get("webhook-id"), Timestamp: r.Header.Get("webhook-timestamp"),
		Replay: r.Header.Get("webhook-replay") != "", Traceparent: r.Header.Get("traceparent"), Body: body,
	}
	if rc.verify != nil {
		d.Problem = rc.verify.verify(r.Header, body)
		valid := d.Problem == ""
		d.Valid = &valid
	}
	if d.Valid != nil && !*d.Valid {
		d.Status = http.StatusUnauthorized
	} else {
		d.Status = rc.status()
	}
	if err := rc.record(d); err != nil {
		http.Error(w, "cannot record the request", http.StatusInternalServerError)
		return
	}
	w.WriteHeader(d.Status)
}

// receiveLine is one JSON line of `outboxd receive`.
type receiveLine struct {
	ReceivedAt     string          `json:"received_at"`
	WebhookID      string          `json:"webhook_id"`
	Timestamp      any             `json:"timestamp"` // unix seconds; the raw header when not a number; null when absent
	SignatureValid *bool           `json:"signature_valid"`
	Error          string          `json:"error,omitempty"`
	Status         int             `json:"status"`
	Replay         bool            `json:"replay,omitempty"`
	Traceparent    string          `json:"traceparent,omitempty"`
	Body           json.RawMessage `json:"body"` // the JSON body as is (compacted), or a string
}

// jsonLine renders d as one line of JSON, newline included.
func (d *hookRequest) jsonLine() []byte {
	l := receiveLine{
		ReceivedAt: d.At.UTC().Format(time.RFC3339Nano), WebhookID: d.WebhookID, SignatureValid: d.Valid,
		Error: d.Problem, Status: d.Status, Replay: d.Replay, Traceparent: d.Traceparent,
	}
	if n, err := strconv.ParseInt(d.Timestamp, 10, 64); err == nil {
		l.Timestamp = n
	} else if d.Timestamp != "" {
		l.Timestamp = d.Timestamp
	}
	var compact bytes.Buffer
	if json.Valid(d.Body) && json.Compact(&compact, d.Body) == nil {
		l.Body = compact.Bytes()
	} else {
		l.Body, _ = json.Marshal(string(d.Body)) // a string always marshals
	}
	b, _ := json.Marshal(l) // every field marshals
	return append(b, '\n')
}

// receiveSecrets splits space- or comma-separated secrets, as
// OUTBOXD_WEBHOOK_SECRET does.
func receiveSecrets(values ...string) []string {
	var out []string
	for _, v := range values {
		out = append(out, strings.Fields(strings.ReplaceAll(v, ",", " "))...)
	}
	return out
}

func receiveCommand(envMap map[string]string, stdout, stderr io.Writer) *cobra.Command {
	var (
		addr, script, out, secretFile string
		secrets                       []string
		tolerance                     time.Duration
		status                        int
	)
	cmd := &cobra.Command{
		Use:   "receive",
		Short: "Run a webhook receiver that verifies signatures and prints each request as a JSON line",
		Long: `Run a Standard Webhooks receiver for testing an outboxd setup.

Every POST is checked (webhook-id, webhook-timestamp within --tolerance,
webhook-signature with any matching v1 entry) and written as one JSON line:
{"received_at":…,"webhook_id":…,"timestamp":…,"signature_valid":…,"status":…,"body":…}
to standard output, or appended to --out (then standard output gets a short
line per request). An invalid signature is answered 401; otherwise the answer
is --status, or the next code of --script (the last one repeats).

The secret is read from --secret-file, or --secret, or else OUTBOXD_WEBHOOK_SECRET; several secrets
(comma- or space-separated, or --secret repeated) are all accepted, as during a
rotation. Without a secret, signatures are not checked (signature_valid null).`,
		Example: `  OUTBOXD_WEBHOOK_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw outboxd receive --addr 127.0.0.1:8080
  outboxd receive --secret-file /run/secrets/webhook
  outboxd receive --script 503,503,200 --out deliveries.jsonl`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rc := &webhookReceiver{}
			all := receiveSecrets(secrets...)
			switch {
			case secretFile != "":
				s, err := secretFrom(cmd, "", secretFile, stderr)
				if err != nil {
					return err
				}
				all = receiveSecrets(s)
			case cmd.Flags().Changed("secret"):
				fmt.Fprintln(stderr, "warning: a secret given with --secret shows in ps and in shell history; use --secret-file (or - for standard input) or OUTBOXD_WEBHOOK_SECRET")
			default:
				all = receiveSecrets(envMap[envPrefix+"WEBHOOK_SECRET"])
			}
			if len(all) > 0 {
				v, err := newHookVerifier(all, tolerance)
				if err != nil {
					return usageError{fmt.Errorf("--secret: %w", err)}
				}
				rc.verify = v
			} else if tolerance <= 0 {
				return usageError{fmt.Errorf("--tolerance must be positive, got %s", tolerance)}
			}
			switch {
			case cmd.Flags().Changed("script") && cmd.Flags().Changed("status"):
				return usageError{errors.New("--status and --script exclude each other")}
			case cmd.Flags().Changed("script"):
				codes, err := parseHookStatusScript(script)
				if err != nil {
					return usageError{fmt.Errorf("--script: %w", err)}
				}
				s := &hookStatusScript{codes: codes}
				rc.status = s.take
			default:
				codes, err := parseHookStatusScript(strconv.Itoa(status))
				if err != nil {
					return usageError{fmt.Errorf("--status: %w", err)}
				}
				rc.status = func() int { return codes[0] }
			}

			var mu sync.Mutex
			rc.record = func(d *hookRequest) error {
				mu.Lock()
				defer mu.Unlock()
				_, err := stdout.Write(d.jsonLine())
				return err
			}
			if out != "" {
				f, err := os.OpenFile(out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
				if err != nil {
					return fmt.Errorf("open --out file: %w", err)
				}
				defer f.Close()
				rc.record = func(d *hookRequest) error {
					mu.Lock()
					defer mu.Unlock()
					if _, err := f.Write(d.jsonLine()); err != nil {
						return fmt.Errorf("write %s: %w", out, err)
					}
					fmt.Fprintf(stdout, "%s %d webhook-id=%s signature=%s\n",
						d.At.Format("15:04:05.000"), d.Status, d.WebhookID, hookSignatureWord(d))
					return nil
				}
			}

			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("listen on %s: %w", addr, err)
			}
			answer := fmt.Sprint(status)
			if script != "" {
				answer = "script " + script
			}
			checking := "signatures NOT checked (no secret)"
			if rc.verify != nil {
				checking = fmt.Sprintf("signatures checked (%d secret(s), tolerance %s)", len(rc.verify.secrets), tolerance)
			}
			fmt.Fprintf(stderr, "outboxd receive: listening on http://%s/, %s, answering %s\n", ln.Addr(), checking, answer)
			return serveHooks(cmd.Context(), ln, rc)
		},
	}
	cmd.Flags().StringVar(&addr, "addr", "127.0.0.1:8080", "address to listen on")
	cmd.Flags().StringSliceVar(&secrets, "secret", nil, "Standard Webhooks secret(s) whsec_... (visible in ps and shell history: prefer --secret-file or OUTBOXD_WEBHOOK_SECRET, the default)")
	cmd.Flags().StringVar(&secretFile, "secret-file", "", "read the secret(s) from this file (- for standard input), comma- or space-separated")
	cmd.Flags().DurationVar(&tolerance, "tolerance", 5*time.Minute, "accepted difference between webhook-timestamp and the local clock")
	cmd.Flags().IntVar(&status, "status", http.StatusOK, "status code answered to validly signed requests")
	cmd.Flags().StringVar(&script, "script", "", "comma-separated status codes answered in turn, the last one repeating (e.g. 503,503,200)")
	cmd.Flags().StringVar(&out, "out", "", "append JSON lines to this file instead of standard output")
	return cmd
}

func hookSignatureWord(d *hookRequest) string {
	switch {
	case d.Valid == nil:
		return "unchecked"
	case *d.Valid:
		return "valid"
	default:
		return "invalid (" + d.Problem + ")"
	}
}

// serveHooks serves h on ln until ctx ends, then shuts down gracefully:
// a request being recorded is answered.
func serveHooks(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		_ = srv.Close()
	}
	return nil
}
