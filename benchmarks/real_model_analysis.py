"""The analysis of the real-model comparison, from records.csv alone (benchmarks/real_model_records.py)
and the protocol: accuracy ± SE per method and iteration, pooled over seeds and per seed, for the
final vote and the first-round vote; answer parsing and agreement; the pre-registered paired
comparisons with a stratified exact test and Holm-corrected p-values; and, from diversity.csv, the
paper's diversity measures per method and iteration (mean over seeds, ± SE over seeds). `tables()` is the single
source of every number of the result README; tests/test_real_model_analysis.py recomputes the
committed README's tables from records.csv with it.

    python benchmarks/real_model_analysis.py      # rewrite the result README from records.csv

**Stratified exact test.** The unit is a (seed, test problem) pair answered by both methods.
Under H0 (the methods do not differ on any problem), conditional on a pair being discordant, it
favours A with probability 1/2 whatever its seed; so the count favouring A, summed over the seed
strata, is Binomial(D, 1/2) with D the discordant pairs of all strata, and the exact conditional
test stratified by seed is the exact McNemar test on the pooled discordant counts. (Stratification
changes the null distribution of unpaired 2×2 tables, as in Zelen's exact test, because there the
margins differ by stratum; for paired outcomes the conditional null is the same in every stratum.)
The per-seed discordant counts are printed beside it. The interval is Agresti–Min on the pooled
2×2 table (harness.stats): the difference is a mean over pairs, and seeds contribute equal,
design-fixed numbers of pairs.

**Holm** (step-down, controls the family-wise error rate at any dependence): sorted p-values
p(1) ≤ … ≤ p(m) become max over j ≤ i of min(1, (m − j + 1)·p(j)). Written here (five lines)
because scipy has no multiple-testing correction and statsmodels would be a dependency for it.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.fileio import write_atomic  # noqa: E402
from harness.stats import mcnemar_exact, paired_difference_ci  # noqa: E402
from real_model_protocol import Comparison, Protocol, load_protocol  # noqa: E402
from real_model_records import BASELINE, MEASURES, DiversityRow, ProblemRow, read_diversity, read_rows  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "real-model"
NOT_RUN = "No seed of the protocol has been run yet: records.csv has no rows, so there is no result."

Table = tuple[list[str], list[list[str]]]  # header, rows


def holm(p_values: list[float]) -> list[float]:
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def stratified_exact(strata: list[tuple[int, int]]) -> float:
    """Two-sided exact conditional test over discordant pairs, strata = [(A only, B only) per seed]."""
    return mcnemar_exact(sum(a for a, _ in strata), sum(b for _, b in strata))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _acc(values: list[int]) -> str:
    if not values:
        return "—"
    p = sum(values) / len(values)
    return f"{_pct(p)} ± {_pct(math.sqrt(p * (1 - p) / len(values)))} (n={len(values)})"


def _cells(rows: list[ProblemRow]) -> dict[tuple[str, int, int], dict[str, ProblemRow]]:
    """(method, iteration, seed) -> {problem id: row}"""
    out: dict[tuple[str, int, int], dict[str, ProblemRow]] = defaultdict(dict)
    for r in rows:
        out[(r.method, r.iteration, r.seed)][r.problem_id] = r
    return out


def _column(rows: list[ProblemRow], method: str, k: int, field: str, seed: int | None = None) -> list[int]:
    return [getattr(r, field) for r in rows
            if r.method == method and r.iteration == k and (seed is None or r.seed == seed)]


def _methods(protocol: Protocol) -> list[tuple[str, str]]:
    return [(BASELINE, "Debate without finetuning (iteration 0)"),
            *((m, spec.label) for m, spec in protocol.methods.items())]


def accuracy_table(rows: list[ProblemRow], protocol: Protocol, field: str, seed: int | None = None) -> Table:
    its = range(protocol.iterations + 1)
    header = ["method", *(f"iter {k}" + (" (Table 2 setting)" if k == 1 else "") for k in its)]
    body = [[label, *(_acc(_column(rows, m, k, field, seed)) for k in its)] for m, label in _methods(protocol)]
    return header, body


def answers_table(rows: list[ProblemRow], protocol: Protocol) -> Table:
    header = ["method", "iter", "n", "final vote parsed %", "first-round vote parsed %", "agents' final answers parsed %",
              "all agree %", "tied final vote %"]
    body = []
    for m, _ in _methods(protocol):
        for k in range(protocol.iterations + 1):
            cell = [r for r in rows if r.method == m and r.iteration == k]
            if not cell:
                continue
            n = len(cell)
            body.append([m, str(k), str(n), _pct(sum(r.parsed for r in cell) / n),
                         _pct(sum(r.first_round_parsed for r in cell) / n),
                         _pct(sum(r.n_parsed for r in cell) / sum(r.n_agents for r in cell)),
                         _pct(sum(r.agreement for r in cell) / n), _pct(sum(r.tie for r in cell) / n)])
    return header, body


def compare(rows: list[ProblemRow], c: Comparison, seeds: list[int], confidence: float) -> dict | None:
    field = "correct" if c.vote == "final" else "first_round_correct"
    cells = _cells(rows)
    strata, table = [], [0, 0, 0, 0]  # both, A only, B only, neither
    for s in seeds:
        a, b = cells.get((c.a, c.a_iteration, s), {}), cells.get((c.b, c.b_iteration, s), {})
        only = [0, 0]
        for pid in sorted(a.keys() & b.keys()):
            x, y = getattr(a[pid], field), getattr(b[pid], field)
            table[(0 if x and y else 1 if x else 2 if y else 3)] += 1
            only[0], only[1] = only[0] + (x and not y), only[1] + (y and not x)
        if a.keys() & b.keys():
            strata.append((s, only[0], only[1]))
    n = sum(table)
    if not n:
        return None
    lo, hi = paired_difference_ci(*table, confidence=confidence)
    return {"n": n, "acc_a": (table[0] + table[1]) / n, "acc_b": (table[0] + table[2]) / n,
            "diff": (table[1] - table[2]) / n, "lo": lo, "hi": hi, "strata": strata,
            "p": stratified_exact([(a, b) for _, a, b in strata])}


def comparisons_table(rows: list[ProblemRow], protocol: Protocol) -> Table:
    seeds = sorted({r.seed for r in rows})
    results = [compare(rows, c, seeds, protocol.confidence) for c in protocol.comparisons]
    # Holm over the whole pre-registered family: a comparison without data yet counts as p = 1,
    # so a partial result is never corrected less than the full one will be.
    adjusted = holm([results[i]["p"] if results[i] else 1.0 for i in range(len(results))])
    ci = f"{round(100 * protocol.confidence)}% CI (pp)"
    header = ["comparison", "vote", "pairs", "acc a %", "acc b %", "difference (pp)", ci,
              "discordant a only / b only, per seed", "p (exact, seed-stratified)", "p (Holm)"]
    body = []
    for i, c in enumerate(protocol.comparisons):
        r = results[i]
        if r is None:
            body.append([c.label, c.vote, "0", "—", "—", "—", "—", "—", "—", "—"])
            continue
        body.append([c.label, c.vote, str(r["n"]), _pct(r["acc_a"]), _pct(r["acc_b"]), f"{100 * r['diff']:+.1f}",
                     f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]",
                     "; ".join(f"s{s}: {a}/{b}" for s, a, b in r["strata"]), _p(r["p"]), _p(adjusted[i])])
    return header, body


DIVERSITY_TITLE = "Diversity, the paper's measures (test split; mean over seeds, ± SE over seeds where several)"
DIVERSITY_HEADER = {"heldout_critic_nll": "held-out-critic NLL", "kl_between_generators": "KL gen ↔ gen",
                    "kl_between_critics": "KL critic ↔ critic", "kl_generators_vs_base": "KL gen vs base",
                    "kl_critics_vs_base": "KL critic vs base", "embedding_dissimilarity": "embedding dissimilarity",
                    "pairwise_agreement": "pairwise agreement"}
DIVERSITY_NOTES = [
    "Held-out-critic NLL: mean −log p per token of the other critics' final replies under each critic (nats); "
    "lower means the agents' replies are more alike to one another. KL: Monte-Carlo estimates from the sampled "
    "replies (round 0 for generators, the final round for critics), scored in-process with transformers + PEFT "
    "on the saved adapters (`analysis.likelihood_backend: transformers`). The replies were sampled at the "
    "protocol's temperature, not 1, so the KL estimates are biased: compare them across methods and iterations, "
    "not as absolute KL. In the single-agent methods every agent is the same model, so the KL between agents is 0 "
    "by construction; at iteration 0 every agent is the base model."]


def _mean_se(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {sd / math.sqrt(len(values)):.4f}"


def diversity_table(diversity: list[DiversityRow], protocol: Protocol) -> Table:
    header = ["method", "iter", "seeds", *(DIVERSITY_HEADER[c] for c in MEASURES)]
    body = []
    for m, _ in _methods(protocol):
        for k in range(protocol.iterations + 1):
            cell = [d for d in diversity if d.method == m and d.iteration == k]
            if cell:
                body.append([m, str(k), str(len(cell)),
                             *(_mean_se([getattr(d, c) for d in cell if getattr(d, c) is not None]) for c in MEASURES)])
    return header, body


def tables(rows: list[ProblemRow], protocol: Protocol, diversity: list[DiversityRow] = ()) -> dict[str, Table]:
    """Every table of the result README, by its heading."""
    out = {
        "Accuracy, final vote, pooled over seeds (% ± SE)": accuracy_table(rows, protocol, "correct"),
        "Accuracy, first-round vote, pooled over seeds (% ± SE)": accuracy_table(rows, protocol, "first_round_correct"),
        "Pre-registered comparisons (paired by seed and problem)": comparisons_table(rows, protocol),
        "Answers: parsing, agreement, ties (pooled over seeds)": answers_table(rows, protocol),
    }
    if diversity:
        out[DIVERSITY_TITLE] = diversity_table(list(diversity), protocol)
    for s in sorted({r.seed for r in rows}):
        out[f"Seed {s}: accuracy, final vote (% ± SE)"] = accuracy_table(rows, protocol, "correct", s)
        out[f"Seed {s}: accuracy, first-round vote (% ± SE)"] = accuracy_table(rows, protocol, "first_round_correct", s)
    return out


def markdown_table(table: Table) -> list[str]:
    header, body = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in body)]


WHY = ("It supersedes the earlier single-seed result, kept as [previous-single-seed.md](previous-single-seed.md) "
       "(the previous, non-preregistered result), because there the temperature was chosen on the test split, no "
       "per-problem records were committed, one seed of 48 problems could not order the methods, six tests were "
       "not corrected for multiplicity, the single model got 4-10x the optimizer steps of each per-agent job, and "
       "47% of the debate baseline's final-round answers did not parse (so the first-round vote is reported too).")


def headline(rows: list[ProblemRow], protocol: Protocol) -> str:
    """The primary comparison (the family's first), pooled and corrected, in one sentence."""
    header, body = comparisons_table(rows, protocol)
    row = dict(zip(header, body[0]))
    c = protocol.comparisons[0]
    if row["pairs"] == "0":
        return f"Primary comparison {c.label}: no data yet."
    ci = next(k for k in header if k.endswith("CI (pp)"))
    return (f"Primary comparison, {c.label} ({c.vote} vote): {row['difference (pp)']} pp, {ci} {row[ci]}, "
            f"n = {row['pairs']} paired problems over seeds {sorted({r.seed for r in rows})}, "
            f"Holm-corrected p = {row['p (Holm)']} (uncorrected {row['p (exact, seed-stratified)']}).")


def render(rows: list[ProblemRow], protocol: Protocol, diversity: list[DiversityRow] = ()) -> str:
    seeds = sorted({r.seed for r in rows})
    lines = [f"# Real model: multiagent vs single-agent finetuning vs debate (protocol {protocol.name})", "",
             f"Pre-registered protocol: [protocol.yaml](protocol.yaml) ({protocol.task_level}; "
             f"{protocol.sizes.n_test} test problems per seed, seeds {protocol.seeds}, {protocol.iterations} "
             f"iterations, Holm correction over {len(protocol.comparisons)} comparisons; tuned settings chosen on a "
             f"dev split disjoint from every test split). Every number below is computed from "
             f"[records.csv](records.csv) by `benchmarks/real_model_analysis.py`, and CI recomputes it "
             f"(tests/test_real_model_analysis.py).", "", WHY, ""]
    if not rows:
        return "\n".join(lines + [f"**{NOT_RUN}**", ""])
    missing = [s for s in protocol.seeds if s not in seeds]
    lines += [f"Seeds in records.csv: {seeds}" + (f"; not yet run: {missing} (the pooled numbers will change)."
                                                  if missing else " (all of the protocol's)."), "",
              f"**{headline(rows, protocol)}**", ""]
    for title, table in tables(rows, protocol, diversity).items():
        lines += [f"## {title}", "", *markdown_table(table), ""]
        if title == DIVERSITY_TITLE:
            lines += [*DIVERSITY_NOTES, ""]
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> dict[str, Table]:
    """{heading: (header, rows)} of every `## heading` followed by a table (the README's form)."""
    out: dict[str, Table] = {}
    title, table_lines = None, []

    def flush() -> None:
        if title is not None and table_lines:
            cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table_lines]
            out[title] = (cells[0], cells[2:])

    for line in text.splitlines():
        if line.startswith("## "):
            flush()
            title, table_lines = line[3:].strip(), []
        elif line.startswith("|") and title is not None:
            table_lines.append(line)
    flush()
    return out


def disagreements(readme: str, rows: list[ProblemRow], protocol: Protocol,
                  diversity: list[DiversityRow] = ()) -> list[str]:
    """Where a README's tables (and headline) differ from what records.csv (and diversity.csv)
    give; [] when they agree."""
    if not rows:
        found = parse_markdown_tables(readme)
        return ([] if NOT_RUN in readme else ["records.csv has no rows but the README does not say no seed has run"]) + \
            [f"table {t!r} printed without any records" for t in found]
    problems = []
    printed, wanted = parse_markdown_tables(readme), tables(rows, protocol, diversity)
    for title in printed.keys() - wanted.keys():
        problems.append(f"table {title!r} is not one the records give")
    for title, (header, body) in wanted.items():
        if title not in printed:
            problems.append(f"table {title!r} is missing")
            continue
        got_header, got_body = printed[title]
        if got_header != header:
            problems.append(f"table {title!r}: header {got_header} != {header}")
        for i in range(max(len(body), len(got_body))):
            want = body[i] if i < len(body) else None
            got = got_body[i] if i < len(got_body) else None
            if want != got:
                problems.append(f"table {title!r}, row {i + 1}: printed {got}, records give {want}")
    if f"**{headline(rows, protocol)}**" not in readme:
        problems.append(f"headline missing or different; records give: {headline(rows, protocol)}")
    return problems


def main() -> None:
    protocol = load_protocol(RESULT / "protocol.yaml")
    write_atomic(RESULT / "README.md", render(read_rows(RESULT / "records.csv"), protocol,
                                              read_diversity(RESULT / "diversity.csv")))
    print((RESULT / "README.md").read_text())


if __name__ == "__main__":
    main()
