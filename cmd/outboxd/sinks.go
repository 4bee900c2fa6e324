package main

import (
	"context"
	"errors"

	"github.com/rs/zerolog"

	"github.com/outboxd/outboxd/decode"
	"github.com/outboxd/outboxd/sink"
)

// closableSink is a sink built from OUTBOXD_SINK other than webhook.
type closableSink interface {
	sink.Sink
	Close()
}

// knownSink reports whether OUTBOXD_SINK names a sink this build has.
func knownSink(kind string) bool { return false }

// sinkVar reports whether name is a variable of one of the non-webhook sinks
// (so it is not warned about as unknown).
func sinkVar(name string) bool { return false }

// buildSink builds the sink named by OUTBOXD_SINK from its variables.
func buildSink(kind string, envMap map[string]string, log zerolog.Logger) (closableSink, error) {
	return nil, errors.New("no sink " + kind)
}

// placeholderSink stands for the sink buildSink makes, during validation.
type placeholderSink struct{}

func (placeholderSink) Name() string { return "placeholder" }
func (placeholderSink) Deliver(context.Context, []*decode.Event) []sink.Outcome {
	return nil
}
