package decode

import (
	"testing"
	"time"
)

// benchProperties is a realistic properties value as jsonb prints it (~330 bytes).
const benchProperties = `{"plan": "enterprise", "items": [{"sku": "SKU-1042", "qty": 3, "price": 19.99}, {"sku": "SKU-2210", "qty": 1, "price": 249.0}], "amount": 309.97, "currency": "EUR", "coupon": null, "customer": {"id": 88123, "email": "jane.doe@example.com", "country": "DE"}, "note": "Expedite – gift wrap \"blue\"", "flags": ["vip", "b2b"]}`

func benchRow() []val {
	return []val{
		txt("1234567"), txt("order_placed"), txt("2026-11-26 10:00:00.123456+00"), txt("4211"), txt("90210"),
		txt("order"), txt("ORD-2026-000123"), txt("5f2b6c1e-8d4a-4f7e-9b1c-2a3d4e5f6a7b"), txt("checkout_service"),
		txt("3"), txt(benchProperties), txt("f"), null, txt("0"),
	}
}

func BenchmarkDecodeInsert(b *testing.B) {
	d := NewDecoder(Table{Name: "domain_event"})
	if _, err := d.Decode(relationMsg(outboxRelID, "public", "domain_event", outboxCols...)); err != nil {
		b.Fatal(err)
	}
	if _, err := d.Decode(beginMsg(1, time.Now(), 1)); err != nil {
		b.Fatal(err)
	}
	data := insertMsg(outboxRelID, benchRow()...)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		m, err := d.Decode(data)
		if err != nil || m.Kind != KindEvent {
			b.Fatal(err)
		}
	}
}

func BenchmarkEventFromText(b *testing.B) {
	d := NewDecoder(Table{Name: "domain_event"})
	m, err := d.Decode(relationMsg(outboxRelID, "public", "domain_event", outboxCols...))
	if err != nil {
		b.Fatal(err)
	}
	var values [][]byte
	for _, v := range benchRow() {
		if v.kind == 't' {
			values = append(values, []byte(v.data))
		} else {
			values = append(values, nil)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EventFromText("0a1b2c3d4e5f6789", m.Relation, values); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendBatch(b *testing.B) {
	d := NewDecoder(Table{Name: "domain_event"})
	if _, err := d.Decode(relationMsg(outboxRelID, "public", "domain_event", outboxCols...)); err != nil {
		b.Fatal(err)
	}
	data := insertMsg(outboxRelID, benchRow()...)
	events := make([]*Event, 100)
	for i := range events {
		m, err := d.Decode(data)
		if err != nil {
			b.Fatal(err)
		}
		events[i] = m.Event
	}
	var dst []byte
	b.SetBytes(int64(100 * len(events[0].Body)))
	b.ReportAllocs()
	for b.Loop() {
		dst = AppendBatch(dst[:0], events)
	}
}
