package sink

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestForbiddenReason(t *testing.T) {
	t.Parallel()
	tests := []struct {
		addr      string
		forbidden bool
	}{
		// IPv4 public.
		{"8.8.8.8", false},
		{"1.1.1.1", false},
		{"93.184.216.34", false},
		{"100.63.255.255", false}, // just below CGNAT
		{"100.128.0.0", false},    // just above CGNAT
		{"172.32.0.1", false},     // just above 172.16/12
		{"11.0.0.1", false},
		{"223.255.255.255", false},
		// IPv4 refused.
		{"0.0.0.0", true},
		{"0.1.2.3", true},
		{"127.0.0.1", true},
		{"127.255.255.254", true},
		{"10.0.0.1", true},
		{"10.255.255.255", true},
		{"172.16.0.1", true},
		{"172.31.255.255", true},
		{"192.168.1.1", true},
		{"169.254.169.254", true}, // cloud metadata
		{"100.64.0.1", true},      // CGNAT
		{"100.127.255.255", true},
		{"192.0.0.8", true},
		{"198.18.0.1", true},
		{"224.0.0.1", true},
		{"239.255.255.250", true},
		{"240.0.0.1", true},
		{"255.255.255.255", true},
		// IPv6 public.
		{"2606:4700:4700::1111", false},
		{"2001:4860:4860::8888", false},
		{"64:ff9b::808:808", false}, // NAT64 of 8.8.8.8
		{"::ffff:8.8.8.8", false},
		{"2002:808:808::1", false}, // 6to4 of 8.8.8.8
		// IPv6 refused.
		{"::", true},
		{"::1", true},
		{"fc00::1", true},
		{"fd12:3456:789a::1", true},
		{"fe80::1", true},
		{"fe80::1%eth0", true},
		{"febf:ffff::1", true},
		{"fec0::1", true},
		{"ff02::1", true},
		{"100::1", true},
		{"::127.0.0.1", true}, // IPv4-compatible
		{"::ffff:127.0.0.1", true},
		{"::ffff:10.1.2.3", true},
		{"::ffff:169.254.169.254", true},
		{"::ffff:0.0.0.0", true},
		{"::ffff:100.64.0.1", true},
		{"::ffff:0:127.0.0.1", true}, // IPv4-translated
		{"64:ff9b::a9fe:a9fe", true}, // NAT64 of 169.254.169.254
		{"64:ff9b::127.0.0.1", true},
		{"64:ff9b::a00:1", true}, // NAT64 of 10.0.0.1
		{"64:ff9b:1::1", true},   // local-use NAT64
		{"2002:7f00:1::1", true}, // 6to4 of 127.0.0.1
		{"2002:a9fe:a9fe::", true},
		{"2001:0:4136:e378:8000:63bf:80ff:fffe", true}, // Teredo, client 127.0.0.1
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			t.Parallel()
			a := netip.MustParseAddr(tt.addr)
			why := forbiddenReason(a)
			if tt.forbidden {
				require.NotEmpty(t, why, "%s must be refused", tt.addr)
			} else {
				require.Empty(t, why, "%s must be allowed", tt.addr)
			}
		})
	}
	require.Equal(t, "invalid", forbiddenReason(netip.Addr{}))
}

func TestRefuseReserved(t *testing.T) {
	t.Parallel()
	err := refuseReserved("tcp4", "127.0.0.1:8080", nil)
	require.ErrorIs(t, err, ErrForbiddenAddress)
	require.Contains(t, err.Error(), "127.0.0.1 is loopback")

	err = refuseReserved("tcp6", "[::ffff:127.0.0.1]:443", nil)
	require.ErrorIs(t, err, ErrForbiddenAddress)
	require.Contains(t, err.Error(), "IPv4-mapped loopback")

	require.ErrorIs(t, refuseReserved("tcp6", "[fe80::1%eth0]:443", nil), ErrForbiddenAddress)
	require.ErrorIs(t, refuseReserved("tcp", "not-an-address", nil), ErrForbiddenAddress)
	require.NoError(t, refuseReserved("tcp4", "8.8.8.8:443", nil))
	require.NoError(t, refuseReserved("tcp6", "[2606:4700:4700::1111]:443", nil))
}
