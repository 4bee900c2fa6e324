package sink

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// ErrForbiddenAddress is the cause of a delivery refused because the address
// actually dialled is loopback, private, link-local or otherwise not a public
// unicast address, and the sink does not allow private destinations
// (WebhookConfig.AllowPrivate). Such a delivery fails with ErrPermanent too.
var ErrForbiddenAddress = errors.New("forbidden destination address (loopback, private or reserved; see AllowPrivate)")

type reservedPrefix struct {
	prefix netip.Prefix
	why    string
}

// reserved lists the destinations refused without AllowPrivate. More specific
// prefixes come first so that the reason is the most precise one.
var reserved = []reservedPrefix{
	// IPv4.
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "carrier-grade NAT"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignment"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},
	// IPv6.
	{netip.MustParsePrefix("::/128"), "unspecified"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("::/96"), "IPv4-compatible (deprecated)"},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "local-use NAT64"},
	{netip.MustParsePrefix("100::/64"), "discard-only"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (private)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("fec0::/10"), "site-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// Prefixes of IPv6 forms that embed an IPv4 address, which is then judged.
var (
	nat64Prefix  = netip.MustParsePrefix("64:ff9b::/96")    // RFC 6052, IPv4 in the last 32 bits
	siitPrefix   = netip.MustParsePrefix("::ffff:0:0:0/96") // RFC 2765 IPv4-translated
	sixToFour    = netip.MustParsePrefix("2002::/16")       // RFC 3056, IPv4 in bits 16-47
	teredoPrefix = netip.MustParsePrefix("2001::/32")       // RFC 4380, client IPv4 inverted in the last 32 bits
)

// forbiddenReason returns why a is not an acceptable destination without
// AllowPrivate ("loopback", "private", …), or "" when a is a public unicast
// address.
func forbiddenReason(a netip.Addr) string {
	if !a.IsValid() {
		return "invalid"
	}
	a = a.WithZone("")
	if a.Is4In6() {
		if why := forbiddenReason(a.Unmap()); why != "" {
			return "IPv4-mapped " + why
		}
		return ""
	}
	if a.Is6() {
		b := a.As16()
		var embedded netip.Addr
		var form string
		switch {
		case nat64Prefix.Contains(a):
			embedded, form = netip.AddrFrom4([4]byte(b[12:16])), "NAT64 "
		case siitPrefix.Contains(a):
			embedded, form = netip.AddrFrom4([4]byte(b[12:16])), "IPv4-translated "
		case sixToFour.Contains(a):
			embedded, form = netip.AddrFrom4([4]byte(b[2:6])), "6to4 "
		case teredoPrefix.Contains(a):
			embedded, form = netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]}), "Teredo "
		}
		if embedded.IsValid() {
			if why := forbiddenReason(embedded); why != "" {
				return form + why
			}
			return ""
		}
	}
	for _, r := range reserved {
		if r.prefix.Contains(a) {
			return r.why
		}
	}
	return ""
}

// refuseReserved is a net.Dialer.Control function. It runs after name
// resolution on the address about to be connected to, so a DNS answer that
// changes between a check and the dial (DNS rebinding) cannot get around it.
func refuseReserved(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: unparsable address %q", ErrForbiddenAddress, address)
	}
	if why := forbiddenReason(ap.Addr()); why != "" {
		return fmt.Errorf("%w: %s is %s", ErrForbiddenAddress, ap.Addr(), why)
	}
	return nil
}
