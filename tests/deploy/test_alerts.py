"""The alerts prod ships (overlays/prod/prometheus-rules.yaml) against the code and docs/sre.md.

An alert on a metric the code does not export, on a label it lacks or a label value it never
sets, evaluates to nothing: it stays silent forever and nobody notices. So every expression is
read here: its metrics must be exported with the labels it selects and groups by, the counters it
takes `increase()` of must exist at 0 from the start, and docs/sre.md must list the same alerts.
"""

from __future__ import annotations

import re

import grpc

from tests.deploy.manifests import REPO, Obj, by_kind, render, selects
from tests.support.docs import SRE, TARGET_LABELS, exported_metrics

RULE_FILE = "deploy/k8s/overlays/prod/prometheus-rules.yaml"
SEVERITIES = {"critical", "warning"}
# Metrics that other exporters serve, with the labels they carry.
EXTERNAL_METRICS = {
    "kube_job_failed": ("namespace", "job_name", "condition", "reason"),  # kube-state-metrics
    "kube_cronjob_status_last_successful_time": ("namespace", "cronjob"),  # kube-state-metrics
    # the kubelet, per PersistentVolumeClaim of a running pod
    "kubelet_volume_stats_available_bytes": ("namespace", "persistentvolumeclaim"),
    "kubelet_volume_stats_capacity_bytes": ("namespace", "persistentvolumeclaim"),
    "up": ("job", "instance"),  # Prometheus itself, per scrape target (and the target labels)
}
# Labelled counters that an alert takes increase() or rate() of, and the test that shows each label set the
# alert needs is exported at 0 before its first increment (increase() cannot see a series that
# first appears at 1). An unlabelled counter is exported at 0 when it is created.
COUNTERS_AT_ZERO_FROM_THE_START = {
    "livegifts_dead_letters_total": (
        "tests/unit/test_consumer_loop.py",
        "test_a_consumers_dead_letter_and_consumed_counts_are_exported_at_zero_from_its_start",
    ),
    "livegifts_events_consumed_total": (
        "tests/unit/test_consumer_loop.py",
        "test_a_consumers_dead_letter_and_consumed_counts_are_exported_at_zero_from_its_start",
    ),
    "livegifts_background_item_failures_total": (
        "tests/integration/test_counters_at_zero.py",
        "test_a_services_failure_counters_are_on_its_metrics_at_zero_from_its_start",
    ),
    "livegifts_consumer_loop_failures_total": (
        "tests/unit/test_consumer_loop.py",
        "test_a_consumers_dead_letter_and_consumed_counts_are_exported_at_zero_from_its_start",
    ),
    "livegifts_provider_call_failures_total": (
        "tests/integration/test_counters_at_zero.py",
        "test_a_services_failure_counters_are_on_its_metrics_at_zero_from_its_start",
    ),
    "livegifts_payout_callbacks_refused_total": (
        "tests/unit/test_payout_callbacks.py",
        "test_refused_payout_callbacks_are_exported_at_zero_from_the_start",
    ),
    "livegifts_transaction_retries_total": (
        "tests/unit/test_wallet_spend_retries.py",
        "test_spend_retries_are_exported_at_zero_from_the_start",
    ),
    "livegifts_purchase_outcomes_total": (
        "tests/integration/test_counters_at_zero.py",
        "test_a_services_failure_counters_are_on_its_metrics_at_zero_from_its_start",
    ),
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
RULE_FIELDS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def _rule_objects() -> list[Obj]:
    return by_kind(render("prod"), "PrometheusRule")


def _rules() -> list[Obj]:
    return [r for obj in _rule_objects() for group in obj["spec"]["groups"] for r in group["rules"]]


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rules)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings() -> dict[str, str]:
    return {_slug(h): h for h in re.findall(r"^#{2,4} (.+)$", SRE, flags=re.M)}


def _without_strings(expr: str) -> str:
    return re.sub(r'"[^"]*"', '""', expr)


def _metric_names(expr: str) -> list[str]:
    """Every series name an expression reads: identifiers that are no function, keyword or label."""
    text = _without_strings(expr)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping label lists
    text = re.sub(r"\{[^}]*\}", " ", text)  # selectors
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    names = []
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        if m.group(2) is None and m.group(1) not in PROMQL_WORDS:
            names.append(m.group(1))
    return names


def _labels_of(name: str) -> tuple[str, ...]:
    if name in EXTERNAL_METRICS:
        return EXTERNAL_METRICS[name]
    return exported_metrics()[name][1]


def test_only_prod_ships_the_alerts_as_one_prometheus_rule() -> None:
    # The PrometheusRule needs the prometheus-operator CRDs, as a Cluster needs CloudNativePG's:
    # prod has both, dev (any cluster) neither.
    assert not by_kind(render("dev"), "PrometheusRule")
    (obj,) = _rule_objects()
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["namespace"] == "livegifts"
    assert set(obj["spec"]) == {"groups"}
    for group in obj["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, sorted(group)
        assert group["name"] and group["rules"]


def test_every_alert_has_a_for_a_severity_and_a_runbook_section_of_docs_sre() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), names
    headings = _headings()
    problems = []
    for r in rules:
        name = r.get("alert")
        if not name or not re.fullmatch(r"Livegifts[A-Z]\w+", name):
            problems.append(f"{r}: a rule here is an alert named Livegifts...")
            continue
        unknown = set(r) - RULE_FIELDS
        if unknown:
            problems.append(f"{name}: unknown fields {sorted(unknown)}")
        if not DURATION.fullmatch(str(r.get("for", ""))):
            problems.append(f"{name}: `for` {r.get('for')!r} is not a duration")
        if r.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: severity {r.get('labels', {}).get('severity')!r} not in {SEVERITIES}")
        notes = r.get("annotations", {})
        if not notes.get("summary") or not notes.get("description"):
            problems.append(f"{name}: no summary or description")
            continue
        runbook = notes.get("runbook", "")
        anchor = runbook.removeprefix("docs/sre.md#")
        if anchor == runbook or anchor not in headings:
            problems.append(f"{name}: runbook {runbook!r} is no section of docs/sre.md")
        elif f'"{headings[anchor]}"' not in " ".join(notes["description"].split()):
            problems.append(f'{name}: the description does not name the section "{headings[anchor]}"')
    assert not problems, "\n".join(problems)


def test_every_metric_an_alert_reads_is_exported_with_the_labels_it_uses() -> None:
    exported = exported_metrics()
    problems = []
    for r in _rules():
        name, expr = r["alert"], r["expr"]
        metrics = _metric_names(expr)
        assert metrics, f"{name}: reads no metric"
        unknown = [m for m in metrics if m not in exported and m not in EXTERNAL_METRICS]
        if unknown:
            problems.append(f"{name}: the services export no {unknown}")
            continue
        have = set().union(*(_labels_of(m) for m in metrics))
        for metric, selector in re.findall(r"\b([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
            for label in re.findall(r"(?:^|,)\s*([a-zA-Z_]\w*)", _without_strings(selector)):
                if label not in _labels_of(metric):
                    problems.append(f"{name}: {metric} has no label {label}")
        for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in re.split(r"\s*,\s*", labels.strip()):
                if label not in have | TARGET_LABELS:
                    problems.append(f"{name}: groups by {label}, which {metrics} do not have")
    assert not problems, "\n".join(problems)


def test_every_label_value_an_alert_selects_is_one_the_code_sets() -> None:
    # `{operation="wallet_spend"}` or `{code=~"INTERNAL|UNAVAILABLE"}` matches nothing, silently,
    # when the code calls it something else.
    source = "\n".join(p.read_text() for p in (REPO / "services").rglob("*.py"))
    codes = {c.name for c in grpc.StatusCode}
    bad = []
    for r in _rules():
        for metric, selector in re.findall(r"\b(livegifts_[a-z0-9_]+)\{([^}]*)\}", r["expr"]):
            for label, op, value in re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
                values = value.split("|") if "~" in op else [value]
                for v in values:
                    if not re.fullmatch(r"[\w.-]+", v):
                        bad.append(f"{r['alert']}: {label}{op}{value!r}: only plain alternatives are checked")
                    elif not (label == "code" and v in codes) and f'"{v}"' not in source:
                        bad.append(f'{r["alert"]}: {metric}{{{label}="{v}"}}')
    assert not bad, f"alerts select label values no service sets: {bad}"


def test_every_counter_an_alert_takes_the_increase_or_rate_of_is_exported_at_zero_from_the_start() -> None:
    from prometheus_client import REGISTRY

    exported = exported_metrics()
    problems = []
    for r in _rules():
        # rate() too: the first failures after a pod starts show no rate without a sample before them.
        for fn, inner in re.findall(r"\b(increase|rate)\(([^\[]*)\[", r["expr"]):
            (metric,) = _metric_names(inner)
            if fn == "rate" and not metric.endswith("_total"):
                continue  # a histogram's _count: its series come with the first observation of their labels
            family, labels = exported[metric]
            if not labels:
                # Created at import, so exported at 0 before anything increments it.
                if REGISTRY.get_sample_value(f"{family}_total") is None:
                    problems.append(f"{r['alert']}: {metric} is not exported from the start")
                continue
            shown = COUNTERS_AT_ZERO_FROM_THE_START.get(metric)
            if shown is None:
                problems.append(
                    f"{r['alert']}: {metric} has labels {labels}: create the label sets the alert needs at "
                    "start, test that, and name the test in COUNTERS_AT_ZERO_FROM_THE_START"
                )
                continue
            path, test = shown
            if f"def {test}(" not in (REPO / path).read_text():
                problems.append(f"{r['alert']}: {path} has no {test}")
    assert not problems, "\n".join(problems)


def _alert_on_paragraph() -> str:
    m = re.search(r"^Alert on.*?(?:\n\n|\Z)", SRE, flags=re.M | re.S)
    assert m, 'docs/sre.md has no "Alert on" paragraph'
    return m.group(0)


def test_docs_sre_lists_exactly_the_alerts_the_rule_file_has() -> None:
    paragraph = _alert_on_paragraph()
    assert RULE_FILE in " ".join(paragraph.split()), f"the paragraph does not point at {RULE_FILE}"
    listed = set(re.findall(r"`(Livegifts[A-Z]\w+)`", paragraph))
    shipped = {r["alert"] for r in _rules()}
    assert listed == shipped, (
        f"in docs only: {sorted(listed - shipped)}; in the rule file only: {sorted(shipped - listed)}"
    )


def _scraped_jobs() -> set[str]:
    """The `job` of each target the prod ServiceMonitor makes: the name of each Service it selects
    (the operator's default, as it sets no jobLabel); tests/deploy/test_k8s.py checks the rest of it."""
    objs = render("prod")
    (monitor,) = by_kind(objs, "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"], "the job names below assume the Service's name"
    return {
        s["metadata"]["name"]
        for s in by_kind(objs, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    }


def test_the_scrape_alerts_watch_exactly_the_jobs_the_service_monitor_makes() -> None:
    # `up{job="wallet"}` when the job is livegifts-wallet: the target-down alert never fires and
    # the absent() one fires for ever. Each alert must name every job, and no other.
    jobs = _scraped_jobs()
    assert jobs == {f"livegifts-{svc}" for svc in ("wallet", "gifting", "payout")}, jobs
    by_name = {r["alert"]: " ".join(r["expr"].split()) for r in _rules()}
    down = re.fullmatch(
        r'max by \(namespace, job, pod\) \(up\{job=~"([\w|-]+)"\}\) == 0', by_name["LivegiftsMetricsTargetDown"]
    )
    assert down and set(down.group(1).split("|")) == jobs, by_name["LivegiftsMetricsTargetDown"]
    missing = by_name["LivegiftsMetricsTargetsMissing"].split(" or ")
    assert sorted(missing) == sorted(f'absent(up{{job="{job}"}})' for job in jobs), missing


def test_the_chargeback_alert_is_chargebacks_over_successes_in_one_window_and_ignores_tiny_volumes() -> None:
    # A ratio whose two sides read different windows compares nothing; one without a floor on the
    # successes fires on the first dispute of a quiet day (1 of 20 is 5 %); a page for it wakes
    # someone for what is a trust-and-safety ticket.
    (rule,) = [r for r in _rules() if r["alert"] == "LivegiftsChargebackRateHigh"]
    expr = " ".join(rule["expr"].split())
    share = r'sum by \(namespace\) \(increase\(livegifts_purchase_outcomes_total\{outcome="(\w+)"\}\[(\w+)\]\)\)'
    m = re.fullmatch(
        rf"{share} / {share} > ([\d.]+) and on \(namespace\) {share} >= (\d+)",
        expr,
    )
    assert m, expr
    over, window, under, window_2, threshold, floor_of, window_3, floor = m.groups()
    assert (over, under, floor_of) == ("CHARGED_BACK", "SUCCEEDED", "SUCCEEDED"), expr
    assert window == window_2 == window_3 == "1d", expr
    assert 0 < float(threshold) <= 0.015, threshold  # the card networks' programmes start near 1 %
    assert int(floor) >= 100, floor  # at least a few chargebacks before the ratio can pass
    assert rule["labels"]["severity"] == "warning"


def _minutes(duration: str) -> int:
    """A rule's `for` or range window ("10m", "1h") in minutes."""
    value, unit = int(duration[:-1]), duration[-1]
    return value * {"m": 1, "h": 60, "d": 1440}[unit]


def _stated_terms_problems(name: str, text: str, rule: Obj) -> list[str]:
    """What `text` (the docs' or the rule's own words about the alert) says against its rule."""
    expr, problems = " ".join(rule["expr"].split()), []
    # "for 10 min(utes)", "over 5 min": the rule's `for`, or `for` plus its expression's window
    # when the words count from the first failure (a consumer retrying for 15m + 10m = 25 min).
    windows = [_minutes(w) for w in re.findall(r"\[(\d+[mhd])\]", expr)]
    allowed = {_minutes(rule["for"])} | {_minutes(rule["for"]) + w for w in windows}
    for minutes in re.findall(r"(?i)\b(?:for|over) (\d+) min", text):
        if int(minutes) not in allowed:
            problems.append(f"{name}: says {minutes} min, the rule fires after {sorted(allowed)} min")
    for seconds in re.findall(r"\babove (\d+) s\b", text):
        if f"> {seconds}" not in expr:
            problems.append(f"{name}: says above {seconds} s, the rule has {expr!r}")
    if "more than a day" in text and "> 86400" not in expr:
        problems.append(f"{name}: says more than a day, the rule has {expr!r}")
    for days in re.findall(r"\bmore than (\d+) days\b", text):
        if f"> {int(days) * 86400}" not in expr:
            problems.append(f"{name}: says more than {days} days, the rule has {expr!r}")
    for percent in re.findall(r"> (\d+) ?%", text):
        if f"> {int(percent) / 100}" not in expr:
            problems.append(f"{name}: says > {percent} %, the rule has {expr!r}")
    return problems


def test_the_thresholds_and_durations_the_docs_and_descriptions_give_are_the_rules() -> None:
    # "above 60 s for 5 min": an SRE reading docs/sre.md or a firing alert's description takes
    # those numbers for the rule's; a rule retuned without them misleads in the middle of a page.
    rules = {r["alert"]: r for r in _rules()}
    # Each alert named in the paragraph, with the words since the previous one (or the clause).
    parts = re.split(r"\(`(Livegifts[A-Z]\w+)`\)", " ".join(_alert_on_paragraph().split()))
    problems = []
    checked = 0
    for text, name in zip(parts[0::2], parts[1::2], strict=False):
        clause = re.split(r";|\): ", text)[-1]
        problems += _stated_terms_problems(name, clause, rules[name])
        checked += bool(re.search(r"\d+ min|above \d+ s|more than (?:a|\d+) days?|> \d+ ?%", clause))
    for name, rule in rules.items():
        description = " ".join(rule["annotations"]["description"].split())
        problems += _stated_terms_problems(name, description, rule)
    assert checked >= 8, f"only {checked} alerts of the paragraph state a threshold or duration: fix the parsing"
    assert not problems, "\n".join(problems)


def test_every_label_an_alerts_annotations_show_is_one_its_expression_keeps() -> None:
    # "{{ $labels.job }}" renders empty when the expression aggregates `job` away (a `sum by
    # (namespace)`): the page says "Events wait in the  outbox" and names nothing to look at.
    problems = []
    for r in _rules():
        shown = set(re.findall(r"\$labels\.(\w+)", str(r["annotations"])))
        expr = " ".join(r["expr"].split())
        kept: set[str] | None = None
        for labels in re.findall(r"\bby \(([^)]*)\)", expr):
            grouped = set(re.split(r"\s*,\s*", labels.strip()))
            kept = grouped if kept is None else kept & grouped
        if kept is None:  # no aggregation: absent() keeps the labels its selector matches on
            kept = set(re.findall(r'\b(\w+)="', expr)) if expr.startswith("absent(") else shown
        if shown - kept:
            problems.append(f"{r['alert']}: shows {sorted(shown - kept)}, which {expr!r} does not keep")
    assert not problems, "\n".join(problems)


def _review_promise_days() -> int:
    """The days creators are promised review and payment in, as docs/sre.md states it (and
    ../shared/DOMAIN.md, the business's page, where the clone has it beside)."""
    (days,) = set(re.findall(r"promised review and payment within (\d+) days", " ".join(SRE.split())))
    domain = REPO.parent / "shared" / "DOMAIN.md"
    if domain.exists():
        assert f"reviewed and paid within {days} days" in " ".join(domain.read_text().split())
    return int(days)


def test_the_review_alert_fires_after_a_long_weekend_and_well_before_the_promise_is_broken() -> None:
    # At a day it fired every weekend (Friday's requests wait for Monday's review). Too late, and
    # after the provider's day (LivegiftsWithdrawalProcessingTooLong) no week is left to review
    # the queue and chase a payment that sticks before the promise.
    (rule,) = [r for r in _rules() if r["alert"] == "LivegiftsWithdrawalReviewTooLong"]
    expr = " ".join(rule["expr"].split())
    m = re.fullmatch(
        r'max by \(namespace\) \(livegifts_withdrawal_waiting_oldest_seconds\{status="PENDING_REVIEW"\}\) > (\d+)',
        expr,
    )
    assert m, expr
    days = int(m.group(1)) / 86400
    long_weekend_days, payment_days, margin_days = 4.5, 1, 7
    assert long_weekend_days < days <= _review_promise_days() - payment_days - margin_days, days


def _schedule_period_s(schedule: str) -> int:
    """The period of the audit CronJobs' kind of schedule: "M * * * *" hourly, "M H * * *" daily."""
    minute, hour, *days = schedule.split()
    assert minute.isdigit() and days == ["*", "*", "*"], f"not an hourly or daily schedule: {schedule!r}"
    return 3600 if hour == "*" else 86400


def test_an_audit_cronjob_that_stops_succeeding_is_alerted_even_when_no_job_fails() -> None:
    """LivegiftsAuditFailed sees a Job that failed. An audit that no longer runs fails none: the
    CronJob suspended or deleted, a controller that skipped its schedules, a Job whose pod is never
    made (a quota). The books would go unchecked with every alert quiet. So each audit CronJob has
    a threshold on the time since its last success: above one period and the Job's deadline (a
    late run is no alarm), at most three periods and the deadline (a day's hourly audits missing
    is)."""
    objs = render("prod")
    rules = [r for r in _rules() if "kube_cronjob_status_last_successful_time" in r["expr"]]
    assert rules, "no alert watches the audit CronJobs' last success"
    expr = " ".join(" ".join(r["expr"] for r in rules).split())
    for cron in by_kind(objs, "CronJob"):
        name = cron["metadata"]["name"]
        if not name.startswith("livegifts-audit"):
            continue
        m = re.search(
            rf'kube_cronjob_status_last_successful_time\{{cronjob="{re.escape(name)}"\}}\) > (\d+)',
            expr,
        )
        assert m, f"no threshold on the last success of {name}: {expr}"
        period = _schedule_period_s(cron["spec"]["schedule"])
        deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        threshold = int(m.group(1))
        assert period + deadline <= threshold <= 3 * period + deadline, (
            f"{name}: {threshold} s without a success, for a run every {period} s that may take {deadline} s"
        )


def _prod_volume_claims(objs: tuple[Obj, ...]) -> set[str]:
    """The PersistentVolumeClaims prod makes: <template>-<statefulset>-<n> per StatefulSet pod, and
    CloudNativePG's <cluster>-<n> (data) and <cluster>-<n>-wal per instance (numbered from 1)."""
    claims = set()
    for sts in by_kind(objs, "StatefulSet"):
        for template in sts["spec"].get("volumeClaimTemplates", []):
            for n in range(sts["spec"]["replicas"]):
                claims.add(f"{template['metadata']['name']}-{sts['metadata']['name']}-{n}")
    for cluster in by_kind(objs, "Cluster"):
        for n in range(1, cluster["spec"]["instances"] + 1):
            claims.add(f"{cluster['metadata']['name']}-{n}")
            if "walStorage" in cluster["spec"]:
                claims.add(f"{cluster['metadata']['name']}-{n}-wal")
    return claims


def test_every_volume_prod_makes_is_alerted_before_it_is_full() -> None:
    """A database volume that fills refuses every write (STORAGE_FULL), and at the planning volume
    prod's 20 Gi fill within weeks (docs/sre.md, "Capacity"); the services' own metrics show it
    only once calls fail. So every PersistentVolumeClaim of the prod namespace (the CloudNativePG
    data and WAL volumes, the NATS JetStream volumes) is watched, with room left to grow it."""
    objs = render("prod")
    claims = _prod_volume_claims(objs)
    assert len(claims) == 3 * 3 * 2 + 3, sorted(claims)
    rules = [r for r in _rules() if "kubelet_volume_stats_available_bytes" in r["expr"]]
    assert rules, "no alert watches the volumes' free space"
    (rule,) = rules
    expr = " ".join(rule["expr"].split())
    (namespace,) = {o["metadata"]["namespace"] for o in objs if o["kind"] != "Namespace"}
    for metric in ("kubelet_volume_stats_available_bytes", "kubelet_volume_stats_capacity_bytes"):
        m = re.search(rf"{metric}\{{([^}}]*)\}}", expr)
        assert m, f"{metric} is not read with a selector: {expr}"
        selector = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        assert selector == {"namespace": namespace}, f"{metric}: selects {selector}, not every claim of {namespace}"
    threshold = re.search(r"\) > (0\.\d+)$", expr)
    assert threshold and float(threshold.group(1)) <= 0.85, f"too late to grow a volume: {expr}"
    assert "persistentvolumeclaim" in re.search(r"by \(([^)]*)\)", expr).group(1), "the page must name the volume"


def test_events_parked_page_even_when_their_park_was_never_counted_and_not_twice_when_it_was() -> None:
    """LivegiftsDeadLetters takes increase() of a counter only the process whose insert made the
    row increments, after its commit (a copy of a parked event counts nothing): one killed between
    the two or before its next scrape (a rollout, an OOM kill) left the park uncounted anywhere and
    nothing paged. So an alert reads the rows' gauge too, per consumer; it is kept silent while a
    counted park of the consumer is within a window the counter's alert has fired and cleared in,
    so one park pages once."""
    rules = {r["alert"]: r for r in _rules()}
    counted = rules["LivegiftsDeadLetters"]
    counted_window = re.search(r"increase\(livegifts_dead_letters_total\[(\w+)\]\)", counted["expr"])
    assert counted_window, counted["expr"]
    backstops = [r for r in rules.values() if "livegifts_dead_letters_parked" in r["expr"]]
    assert backstops, "no alert reads livegifts_dead_letters_parked: an uncounted park pages nobody"
    (rule,) = backstops
    expr = " ".join(rule["expr"].split())
    m = re.fullmatch(
        r"max by \(namespace, consumer\) \(livegifts_dead_letters_parked\) > 0"
        r" unless on \(namespace, consumer\)"
        r" sum by \(namespace, consumer\) \(increase\(livegifts_dead_letters_total\[(\w+)\]\)\) > 0",
        expr,
    )
    assert m, expr
    assert _minutes(m.group(1)) >= _minutes(counted_window.group(1)) + _minutes(counted["for"]), expr
    assert _minutes(rule["for"]) <= 30, "an uncounted park waits too long for its page"
    assert rule["labels"]["severity"] == counted["labels"]["severity"]
