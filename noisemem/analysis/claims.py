"""The paper's claims, each in words next to the numbers that support or contradict it.

:func:`claims` reads the analysis tables of an :class:`~noisemem.analysis.results.Analysis`
(never the store itself) and gives one row per claim and subject (a config or a sweep
family): the claim and where the paper makes it, the evidence (the numbers, with their 95%
intervals), the headline number and a verdict (:data:`VERDICTS`). The thresholds a verdict
uses are the module's constants, and the report states them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from noisemem.analysis import html as H
from noisemem.analysis import laws

if TYPE_CHECKING:
    from noisemem.analysis.results import Analysis

NAN = float("nan")
#: a slope counts as the expected order when within this of it (or its interval holds it)
SLOPE_TOLERANCE = 0.25
#: the large-n coefficient counts as the exact one within this relative error
LARGE_N_TOLERANCE = 0.10
#: R counts as following the without-replacement law within this factor at every batch size
LAW_FACTOR = 1.5
VERDICTS = ("supported", "contradicted", "mixed", "inconclusive", "measured", "not measured")

CLAIM_COLUMNS = [
    "claim",
    "source",
    "statement",
    "subject",
    "evidence",
    "value",
    "low",
    "high",
    "verdict",
]

STATEMENTS = {
    "exact_expectation": (
        "Sec. 6.2, App. G; THEORY §4",
        "For heavy ball (and Nesterov) E[M] over batch orders has a closed form: the Monte "
        "Carlo mean lies within 4 standard errors of the exact expectation.",
    ),
    "noise_grows": (
        "Sec. 6.2; THEORY §4-5",
        "The noise part of E[M] (the implicit regularization by mini-batch noise) grows as "
        "the batch shrinks, as the without-replacement variance (N-b)/(b(N-1)) does (for "
        "heavy ball times the exact noise coefficient h c_noise(n, m)).",
    ),
    "variance_law": (
        "THEORY §5",
        "The mini-batch variance regularizer R = E|g_i - g|^2 scales as (N-b)/(b(N-1)) with "
        "the batch size (batches drawn without replacement).",
    ),
    "full_batch_adam": (
        "App. A (open); THEORY §8",
        "For Adam the full-batch prediction (Lemma K.2) stops explaining E[M] as the batch "
        "shrinks: its cosine with E[M] falls.",
    ),
    "large_n": (
        "Sec. 6.2; THEORY §4, §8",
        "Heavy ball's noise coefficient is beta/((1-beta)^2(1+beta)) for large n; the exact "
        "finite-n one agrees only when n >> 1/(1-beta).",
    ),
    "adamw_anti": (
        "Sec. 4",
        "With beta2 > beta1 memory anti-regularizes AdamW: E[M] points against "
        "d = grad ||grad L||_{1,eps}, so the memoryless iteration climbs ||grad L||_1.",
    ),
    "lion_none": (
        "Sec. 4",
        "Memory does not anti-regularize Lion: E[M] does not point against "
        "d = grad ||grad L||_{1,eps}.",
    ),
    "figure1_orders": (
        "Corollary 3.3; Sec. 5, Figure 1",
        "Over a fixed horizon the memoryful run is O(h) from the first-order memoryless run "
        "and O(h^2) from the second-order one (4): log-log slopes 1 and 2 against h.",
    ),
    "figure1_closer": (
        "Sec. 5, Figure 1",
        "The second-order memoryless iteration (4) stays closer to the memoryful run than "
        "the first-order one.",
    ),
    "explained": (
        "Appendix E, Lemmas K.1-K.3; THEORY §8",
        "How much of E[M] each prediction explains (share of |E[M]|^2, debiased).",
    ),
}


def _claim(
    claim: str,
    subject: str,
    evidence: str,
    verdict: str,
    value: float = NAN,
    low: float = NAN,
    high: float = NAN,
) -> dict[str, Any]:
    source, statement = STATEMENTS[claim]
    assert verdict in VERDICTS, verdict
    return {
        "claim": claim,
        "source": source,
        "statement": statement,
        "subject": subject,
        "evidence": evidence,
        "value": float(value),
        "low": float(low),
        "high": float(high),
        "verdict": verdict,
    }


n = H.number
iv = H.interval


def _last_fixed(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows at each config's first fixed probe (init first) and its last step there."""
    if frame.empty:
        return frame
    probes = frame.assign(_rank=(frame["probe"] != "init").astype(int))
    best = probes.sort_values(["config", "_rank", "probe", "step"])
    first_probe = best.groupby("config")["probe"].transform("first")
    best = best[best["probe"] == first_probe]
    last = best.groupby("config")["step"].transform("max")
    return best[best["step"] == last].drop(columns="_rank")


def _exact_claims(a: Analysis) -> list[dict[str, Any]]:
    g = a.agreement
    if g.empty:
        return [
            _claim(
                "exact_expectation",
                "",
                "no config with an exact expectation (heavy ball, Nesterov) in this store",
                "not measured",
            )
        ]
    out = []
    for config, rows in g.groupby("config", sort=True):
        rows = rows[rows["P"] >= 2]
        if rows.empty:
            out.append(_claim("exact_expectation", config, "no finite runs", "not measured"))
            continue
        z = rows["proj_z"].abs().fillna(-1)
        w = rows.loc[z.idxmax()]
        ok = int(rows["within_4se"].sum())
        along = iv(w.proj_exact, w.proj_exact_low, w.proj_exact_high)
        evidence = (
            f"{ok} of {len(rows)} probe points within 4 SE. Farthest, {w.probe} step {w.step}: "
            f"along the exact direction E[M] = {along} x exact (z = {n(w.proj_z, 3)}); "
            f"rms z {n(w.rms_z, 3)} (agreement: {n(w.rms_z_expected, 3)}); {w.beyond_4se} of "
            f"{w.d} coordinates beyond 4 SE (chance allows {w.beyond_4se_allowed}); max |z| "
            f"{n(w.max_abs_z, 3)} (chance maximum {n(w.max_abs_z_chance, 3)}); P = {w.P} runs "
            f"in {w.chunks} chunks."
        )
        verdict = "supported" if ok == len(rows) else "contradicted"
        out.append(
            _claim(
                "exact_expectation",
                config,
                evidence,
                verdict,
                w.proj_exact,
                w.proj_exact_low,
                w.proj_exact_high,
            )
        )
    return out


def _first_probe_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    probe = "init" if (frame["probe"] == "init").any() else sorted(frame["probe"])[0]
    t = frame[frame["probe"] == probe]
    return t[t["epoch"] == t["epoch"].min()]


def _batch_claims(a: Analysis) -> list[dict[str, Any]]:
    t = _first_probe_epoch(a.batch)
    if t.empty:
        return [
            _claim("noise_grows", "", "no batch-size sweep in this store", "not measured"),
            _claim("variance_law", "", "no batch-size sweep in this store", "not measured"),
        ]
    out: list[dict[str, Any]] = []
    r_seen: dict[tuple, int] = {}
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("batch_size")
        exact = g["law"].iloc[0] == "h c_noise s_b"
        values = g["noise_exact" if exact else "noise_mc"].to_numpy(float)
        shrinking = laws.decreasing(values)
        growing = laws.decreasing(values[::-1])
        small, large = g.iloc[0], g.iloc[-1]
        separated = small.noise_mc_low > large.noise_mc_high
        reversed_ = large.noise_mc_low > small.noise_mc_high
        if exact:
            verdict = "supported" if shrinking else "contradicted"
        elif shrinking and separated:
            verdict = "supported"
        elif growing and reversed_:
            verdict = "contradicted"
        else:
            verdict = "inconclusive"
        points = "; ".join(
            f"b={r.batch_size}: "
            + (f"exact {n(r.noise_exact, 3)}, " if exact else "")
            + f"MC {iv(r.noise_mc, r.noise_mc_low, r.noise_mc_high)}, law {n(r.noise_law, 3)}"
            for r in g.itertuples(index=False)
        )
        growth = values[0] / values[-1] if values[-1] > 0 else NAN
        law_growth = small.noise_law / large.noise_law if large.noise_law > 0 else NAN
        evidence = (
            f"{small.probe}, end of epoch {small.epoch}: {points}. From b={large.batch_size} to "
            f"b={small.batch_size} the {'exact' if exact else 'MC'} noise part grows x"
            f"{n(growth, 3)}, the law (shape {small.law}, one fitted scale) x{n(law_growth, 3)}; "
            f"MC/law ratios {n(g['noise_ratio'].min(), 3)} to {n(g['noise_ratio'].max(), 3)}."
        )
        low = high = NAN
        if not exact and large.noise_mc_high > 0 and large.noise_mc_low > 0:
            low = small.noise_mc_low / large.noise_mc_high
            high = small.noise_mc_high / large.noise_mc_low
        out.append(_claim("noise_grows", family, evidence, verdict, growth, low, high))
        series = tuple(zip(g["batch_size"], g["R"].round(12), strict=True))
        if series in r_seen:  # R does not depend on the optimizer at a shared probe point
            row = out[r_seen[series]]
            row["subject"] += f"; {family}"
            continue
        ratios = g["R_ratio"].to_numpy(float)
        ok = bool(np.all((ratios <= LAW_FACTOR) & (ratios >= 1 / LAW_FACTOR)))
        r_growth = small.R / large.R if large.R > 0 else NAN
        s_growth = small.s_b / large.s_b if large.s_b > 0 else NAN
        evidence = (
            f"R from b={large.batch_size} to b={small.batch_size}: x{n(r_growth, 3)}, law "
            f"(N-b)/(b(N-1)) x{n(s_growth, 3)}; R/law {n(ratios.min(), 3)} to "
            f"{n(ratios.max(), 3)} (one fixed split of the data, not a fresh random one)."
        )
        verdict = "supported" if ok else "contradicted"
        r_seen[series] = len(out)
        out.append(_claim("variance_law", family, evidence, verdict, r_growth))
    return out


def _adam_batch_claims(a: Analysis) -> list[dict[str, Any]]:
    t = _first_probe_epoch(a.batch)
    fits = a.fits[a.fits["prediction"] == "full_batch"] if len(a.fits) else a.fits
    t = t[t["optimizer"].isin(laws.ADAM_LIKE)] if len(t) else t
    out = []
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("batch_size")
        rows = [
            fits[
                (fits["config"] == r.config) & (fits["probe"] == r.probe) & (fits["step"] == r.step)
            ]
            for r in g.itertuples(index=False)
        ]
        if any(r.empty for r in rows):
            continue
        cos = [r.iloc[0] for r in rows]
        small, large = cos[0], cos[-1]
        falls = small.cos_high < large.cos_low
        rises = small.cos_low > large.cos_high
        verdict = "supported" if falls else ("contradicted" if rises else "inconclusive")
        evidence = "; ".join(
            f"b={b}: cos {iv(c.cos, c.cos_low, c.cos_high)}, explained "
            f"{iv(c.explained, c.explained_low, c.explained_high)}"
            for b, c in zip(g["batch_size"], cos, strict=True)
        )
        out.append(
            _claim(
                "full_batch_adam",
                family,
                evidence,
                verdict,
                small.cos,
                small.cos_low,
                small.cos_high,
            )
        )
    return out


def _beta_claims(a: Analysis) -> list[dict[str, Any]]:
    t = a.beta
    if t.empty:
        return [
            _claim("large_n", "", "no sweep of heavy ball's beta in this store", "not measured")
        ]
    t = t[t["probe"] == ("init" if (t["probe"] == "init").any() else sorted(t["probe"])[0])]
    t = t[t["step"] == t.groupby("config")["step"].transform("max")]
    out = []
    for family, g in t.groupby("family", sort=True):
        g = g.sort_values("beta")
        close = (g["large_n_over_exact"] - 1).abs() <= LARGE_N_TOLERANCE
        verdict = "supported" if close.all() else ("contradicted" if not close.any() else "mixed")
        evidence = "; ".join(
            f"beta={n(r.beta, 3)} (m={r.num_batches}, n={r.step}): exact {n(r.c_noise_exact, 4)},"
            f" large-n {n(r.c_noise_large_n, 4)} (x{n(r.large_n_over_exact, 3)}), measured "
            f"{iv(r.c_noise_mc, r.c_noise_mc_low, r.c_noise_mc_high)}"
            for r in g.itertuples(index=False)
        )
        worst = g.loc[(g["large_n_over_exact"] - 1).abs().idxmax()]
        out.append(_claim("large_n", family, evidence, verdict, worst.large_n_over_exact))
    return out


def _anti_claims(a: Analysis) -> list[dict[str, Any]]:
    hyper = {r.config: r.hp for r in laws.config_frame(a.tables).itertuples(index=False)}
    adam = [
        c
        for c, hp in hyper.items()
        if hp.get("kind") in laws.ADAM_LIKE
        and float(hp.get("beta2", 0)) > float(hp.get("beta1", 1))
    ]
    lion = [c for c, hp in hyper.items() if hp.get("kind") == "Lion"]
    t = _last_fixed(a.anti)
    out = []
    for claim, configs, what in (
        ("adamw_anti", adam, "AdamW/NAdamW config with beta2 > beta1"),
        ("lion_none", lion, "Lion config"),
    ):
        if not configs:
            out.append(_claim(claim, "", f"no {what} in this study", "not measured"))
            continue
        measured = set(t["config"]) if len(t) else set()
        lacking = [c for c in configs if c not in measured]
        if lacking:
            why = "this store has no anti_regularization prediction (the direction d) for it"
            out.append(_claim(claim, "; ".join(lacking), why, "not measured"))
        for config in configs:
            hit = t[t["config"] == config] if len(t) else t
            if hit.empty:
                continue
            r = hit.iloc[0]
            sign = r.verdict
            if claim == "adamw_anti":
                verdict = {"anti-regularizes": "supported", "regularizes": "contradicted"}.get(
                    sign, "inconclusive"
                )
            else:
                verdict = "contradicted" if sign == "anti-regularizes" else "supported"
            proj = iv(r.proj_mc, r.proj_mc_low, r.proj_mc_high)
            cos = iv(r.cos_mc, r.cos_mc_low, r.cos_mc_high)
            evidence = (
                f"{r.probe} step {r.step}: <E[M], d>/|d| = {proj} ({sign}); cos(E[M], d) = "
                f"{cos}; full-batch prediction {n(r.proj_full_batch, 3)}"
            )
            if np.isfinite(r.proj_noise_aware):
                evidence += f", noise-aware prediction {n(r.proj_noise_aware, 3)}"
            if r.noise_effect != "not measured":
                evidence += f"; mini-batch noise {r.noise_effect} the full-batch conclusion"
            if claim == "adamw_anti":
                a2a1 = n(r.coefficient, 4)
                evidence += f"; a2 - a1 = {a2a1} (limit {n(r.coefficient_limit, 4)})"
            evidence += f"; P = {r.P}."
            out.append(
                _claim(claim, config, evidence, verdict, r.proj_mc, r.proj_mc_low, r.proj_mc_high)
            )
    return out


def _figure1_claims(a: Analysis) -> list[dict[str, Any]]:
    s = a.f1_slopes
    if s.empty:
        evidence = (
            "no configs differing only in lr (or lr and a weight decay scaled as 1/lr) with "
            "recorded l_inf distances (record.memoryless) in this store"
        )
        out = [_claim("figure1_orders", "", evidence, "not measured")]
    else:
        out = []
        for (family, horizon), g in s.groupby(["family", "horizon"], sort=True):
            parts, ok = [], []
            for r in g.sort_values("order").itertuples(index=False):
                holds = abs(r.slope - r.expected) <= SLOPE_TOLERANCE or (
                    r.slope_low <= r.expected <= r.slope_high
                )
                ok.append(bool(holds))
                parts.append(
                    f"{r.order} order: slope {iv(r.slope, r.slope_low, r.slope_high)} "
                    f"(expected {n(r.expected)}; slope of the mean {n(r.slope_of_mean, 3)})"
                )
            r0 = g.iloc[0]
            where = f"T = {n(r0['T'], 3)}" if horizon == "fixed_time" else "every recorded step"
            evidence = (
                f"{horizon.replace('_', ' ')} ({where}), h in {{{r0['lrs']}}}, "
                f"{r0['permutations']} permutations: " + "; ".join(parts) + "."
            )
            verdict = "supported" if all(ok) else ("contradicted" if not any(ok) else "mixed")
            subject = f"{family} [{horizon}]"
            second = g[g["order"] == "second"]
            value = float(second["slope"].iloc[0]) if len(second) else NAN
            low = float(second["slope_low"].iloc[0]) if len(second) else NAN
            high = float(second["slope_high"].iloc[0]) if len(second) else NAN
            out.append(_claim("figure1_orders", subject, evidence, verdict, value, low, high))
    for r in a.f1_regimes.itertuples(index=False):
        b = r.behaviour
        verdict = (
            "supported"
            if b.endswith("throughout")
            else "contradicted"
            if "never" in b
            else "not measured"
            if b == "not measured"
            else "mixed"
        )
        evidence = (
            f"{b}; memory L = {n(r.memory, 4)} steps, horizon {r.steps} steps = "
            f"{n(r.memory_lengths, 3)} memory lengths ({r.memory_regime}), h L = "
            f"{n(r.h_memory, 3)}; closer at {n(r.closer_share, 3)} of steps; final "
            f"second/first distance {n(r.final_ratio, 3)}."
        )
        out.append(_claim("figure1_closer", r.config, evidence, verdict, r.closer_share))
    return out


def _explained_claims(a: Analysis) -> list[dict[str, Any]]:
    f = _last_fixed(a.fits)
    out = []
    for config, g in f.groupby("config", sort=True):
        parts = [
            f"{r.prediction}: {iv(r.explained, r.explained_low, r.explained_high)} "
            f"(cos {iv(r.cos, r.cos_low, r.cos_high)})"
            for r in g.itertuples(index=False)
        ]
        r0 = g.iloc[0]
        evidence = f"{r0.probe} step {r0.step}, P = {r0.P}: " + "; ".join(parts) + "."
        out.append(_claim("explained", config, evidence, "measured"))
    return out


def claims(a: Analysis) -> pd.DataFrame:
    """The paper's claims, each in words next to the numbers of ``a`` that support or
    contradict it, with a verdict (:data:`VERDICTS`) per config or family."""
    rows: list[dict[str, Any]] = []
    for build in (
        _exact_claims,
        _batch_claims,
        _adam_batch_claims,
        _beta_claims,
        _anti_claims,
        _figure1_claims,
        _explained_claims,
    ):
        rows += build(a)
    order = {claim: i for i, claim in enumerate(STATEMENTS)}
    rows.sort(key=lambda r: order[r["claim"]])  # stable: subjects keep their order
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)
