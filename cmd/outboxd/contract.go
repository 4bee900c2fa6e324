package main

import (
	"strings"

	"github.com/outboxd/outboxd/deliver"
)

// contract reads the tracking plan's policies: OUTBOXD_CONTRACT_POLICY for
// every target, OUTBOXD_WEBHOOK_CONTRACT for the webhook (and for the one
// destination of OUTBOXD_SINK, named webhook whatever its kind),
// OUTBOXD_<KIND>_CONTRACT for another destination of OUTBOXD_SINKS and
// OUTBOXD_SUBSCRIPTION_CONTRACT for the webhook subscriptions; each
// defaults to OUTBOXD_CONTRACT_POLICY.
func (c config) contract(envMap map[string]string) (deliver.ContractConfig, error) {
	var cc deliver.ContractConfig
	var err error
	if cc.Default, err = deliver.ParseContractPolicy(strings.TrimSpace(c.ContractPolicy)); err != nil {
		return cc, badVar("CONTRACT_POLICY", "%v", err)
	}
	policy := func(name, value string) (deliver.ContractPolicy, error) {
		value = strings.TrimSpace(value)
		if value == "" {
			return cc.Default, nil
		}
		p, err := deliver.ParseContractPolicy(value)
		if err != nil {
			return "", badVar(name, "%v", err)
		}
		return p, nil
	}
	if cc.Subscriptions, err = policy("SUBSCRIPTION_CONTRACT", c.SubscriptionContract); err != nil {
		return cc, err
	}
	cc.Targets = map[string]deliver.ContractPolicy{}
	for _, name := range c.targetNames() {
		v, value := "WEBHOOK_CONTRACT", c.WebhookContract
		if name != deliver.DefaultTarget {
			v = strings.ToUpper(name) + "_CONTRACT"
			value = envMap[envPrefix+v]
		}
		if cc.Targets[name], err = policy(v, value); err != nil {
			return cc, err
		}
	}
	return cc, nil
}
