"""Rules that tests add to the shipped ones.

``FISHER_MASS_RULE`` is the opt-in rule default_rules.yaml describes, in the form tests need: a
baseline learned from the short default warm-up (3 + 10 evaluations of the defaults
block), so that a scripted series reaches it in a few reports. ``RETENTION_RULE`` is the
opt-in retention rule as default_rules.yaml describes it: an absolute threshold, so a
scripted series fires and resolves it with one value each."""

FISHER_MASS_RULE = """
  - alert: RareSignalFisherCollapse
    metric: probe_fisher_mass_ratio
    op: "<"
    threshold: 0.2
    relative_to: baseline_ratio
    resolve_threshold: 0.3
    for: 3
    severity: critical
"""

RETENTION_RULE = """
  - alert: RareSignalRetentionLoss
    metric: probe_retention
    op: "<"
    threshold: 0.2
    resolve_threshold: 0.266667
    for: 1
    ignore_labels: {probe: [common]}
    severity: critical
"""

# A whole rules file: the training loss above 100 fires at once and resolves at once, so a
# scripted loss fires and resolves it exactly where the script says.
LOSS_HIGH_RULES = """
rules:
  - alert: LossHigh
    metric: loss
    op: ">"
    threshold: 100
    resolve_threshold: 100
    for: 1
    severity: warning
"""

# The defaults block of the shipped file, which the rule above relies on.
SHORT_BASELINE_DEFAULTS = """
defaults:
  baseline: {warmup: 3, window: 10, smoothing: 0.5}
"""
