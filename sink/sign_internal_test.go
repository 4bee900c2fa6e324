package sink

import (
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestSignerMatchesSign checks the pooled signer of the webhook sink against
// the one-shot signature, with one and two keys, concurrently (pooled HMAC
// states must never leak one call's data into another's).
func TestSignerMatchesSign(t *testing.T) {
	secrets := []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2Vjb25kIHNlY3JldCBmb3Igcm90YXRpb24="}
	for _, n := range []int{1, 2} {
		keys, err := decodeSecrets(secrets[:n])
		require.NoError(t, err)
		s := newSigner(keys)
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 200 {
					id := fmt.Sprintf("msg_%d_%d", g, i)
					if i%7 == 0 {
						id = fmt.Sprintf("batch_%d_%d_%0100d", g, i, i) // longer than the scratch space
					}
					body := []byte(fmt.Sprintf(`{"id":%d,"g":%d}`, i, g))
					want, err := Sign(secrets[:n], id, int64(1764151200+i), body)
					require.NoError(t, err)
					require.Equal(t, want, s.sign(id, int64(1764151200+i), body))
				}
			}()
		}
		wg.Wait()
	}
	require.Nil(t, newSigner(nil), "no keys: unsigned")
}

// BenchmarkSigner is the signing cost per webhook request (the pooled path;
// BenchmarkSign measures the one-shot Sign).
func BenchmarkSigner(b *testing.B) {
	keys, err := decodeSecrets([]string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})
	require.NoError(b, err)
	s := newSigner(keys)
	body := make([]byte, 800)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		_ = s.sign("123456", 1764151200, body)
	}
}
