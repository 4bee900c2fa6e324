package sink

// growStack makes sure the calling goroutine has a stack of 8 KiB or more
// before a call goes down net/http's client path, which needs more than the
// 4 KiB a new goroutine usually starts with (deliver's dispatcher starts one
// per sink call). Grown here, a few frames deep, the stack is copied with
// those few frames; grown where the path overflows it, some twenty frames
// deep, the copy's frame adjustments cost about 2.5 µs a request. On a
// goroutine whose stack is large enough already it costs a function call.
//
// Its frame is what makes the runtime grow the stack (the prologue's check);
// the buffer that sizes it is never touched.
//
//go:noinline
func growStack() {
	if growStackNever {
		var pad [growStackFrame]byte
		growStackUse(pad[:])
	}
}

// growStackFrame sizes growStack's frame: with what is used below it and the
// runtime's stack guard, more than 4 KiB, so that a 2 or 4 KiB stack grows
// to 8 KiB at once, and less than 8 KiB less those, so that an 8 KiB one
// does not grow.
const growStackFrame = 4 << 10

// growStackNever is never set: the compiler cannot drop growStack's buffer.
var growStackNever bool

//go:noinline
func growStackUse([]byte) {}
