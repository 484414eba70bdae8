"""Running `cascadectl bench` grids: plan the passkey and RULER-style samples, fit the retention gaps, run them
with progress.

Separate from the command modules (which turn options into settings and results into output) so that the
execution of each benchmark reads on its own, as cascadectl.bench_report does for their rendering. Progress goes
to stderr; results are appended to the caller's list, so a run interrupted by Ctrl-C keeps what it measured."""
from __future__ import annotations

from engine.bench import passkey as pk
from engine.bench import retention as rt
from engine.bench import ruler
from engine.bench.grid import policy_name
from engine.config import CacheConfig
from engine.evidence import retrieval_layers

from . import bench_report as report
from .console import Say, TokenProgress


def passkey_plan(lm, source, configs: list[CacheConfig], points, seed: int, max_tokens: int,
                 question_weight: float) -> tuple[list, list[dict]]:
    """Build and check a sample per grid point (length, depth, sample, prompt) before any model work: returns
    [(sample, the configs that run it)] and the skipped runs (fit_sample)."""
    plan, skipped, warned = [], [], set()
    for n, d, s, q in points:
        sample = pk.make_sample(lm.tokenizer, source, n, d, s, q, seed)
        plan.append((sample, fit_sample(lm, sample, configs, max_tokens, question_weight, skipped, warned)))
    return plan, skipped


def ruler_plan(lm, source, configs: list[CacheConfig], points, seed: int, max_tokens: int | None,
               question_weight: float) -> tuple[list, list[dict]]:
    """As passkey_plan, per grid point (task, length, sample, prompt); `max_tokens` None = each task's own."""
    plan, skipped, warned = [], [], set()
    for task, n, s, q in points:
        sample = ruler.make_sample(lm.tokenizer, source, task, n, s, q, seed)
        budget = ruler.TASKS[task].max_tokens if max_tokens is None else max_tokens
        plan.append((sample, fit_sample(lm, sample, configs, budget, question_weight, skipped, warned,
                                        {"task": task})))
    return plan, skipped


def fit_sample(lm, sample, configs: list[CacheConfig], max_tokens: int, question_weight: float,
               skipped: list[dict], warned: set, where: dict | None = None) -> list[CacheConfig]:
    """The configs that run `sample`, checked (engine.reading.check_room) before any model work.

    Full attention is skipped (once per length and `where`, e.g. the task) where the prompt and answer need more
    positions than the model has, cascade+evidence (once per prompt order) where the question comes only last:
    there is nothing to choose spans by. Each distinct warning about a sample is shown once."""
    runs = []
    for config in configs:
        name = policy_name(config)
        if config.policy == "full" and not pk.fits_full(sample, max_tokens, lm.max_positions):
            skip = {"policy": "full", "length": sample.length, **(where or {})}
            if not any(k.items() >= skip.items() for k in skipped):
                skipped.append({**skip, "reason": (
                    f"needs {sample.n_tokens + max_tokens:,} positions, the model has {lm.max_positions:,}")})
            continue
        if config.evidence and sample.question_span is None:
            if not any(k["policy"] == name and k.get("prompt") == sample.prompt for k in skipped):
                skipped.append({"policy": name, "prompt": sample.prompt,
                                "reason": "needs the question first (--prompt first)"})
            continue
        warning = pk.check_sample(config, sample, lm.max_positions, max_tokens,
                                  pk.is_guided(config, sample, question_weight))
        if warning and warning not in warned:
            warned.add(warning)
            Say.warn(warning)
        runs.append(config)
    return runs


def note_skipped(skipped: list[dict]) -> None:
    """One note on stderr per skipped (policy, length) or (policy, prompt order)."""
    for k in skipped:
        where = (f"at {report.tokens_label(k['length'])} tokens" if "length" in k else
                 f"with the question {k['prompt']}")
        task = f" ({k['task']})" if "task" in k else ""
        Say.info(f"note: {k['policy']} skipped {where}{task}: it {k['reason']}")


def evidence_layers(lm, plan: list) -> dict[int, float] | None:
    """The retrieval layers (engine.evidence.retrieval_layers: calibrated once per model, then read from a file)
    when some run of the plan keeps evidence; else None."""
    if not any(config.evidence for _, runs in plan for config in runs):
        return None
    return retrieval_layers(lm)


def passkey_run(lm, plan: list, max_tokens: int, question_weight: float, quiet: bool,
                results: list[pk.PasskeyResult], layers: dict[int, float] | None = None) -> int:
    """Run the plan with progress on stderr, appending to `results` (the caller's, so an interrupted run keeps
    what it measured); returns the tokens read. `layers`: evidence_layers, for cascade+evidence."""
    def one(config, sample, on_chunk):
        return pk.run_sample(lm.model, lm.tokenizer, config, sample, max_tokens, question_weight, on_chunk, layers)

    return _run("passkey", plan, one, lambda s: f"depth {s.depth:g}", quiet, results)


def ruler_run(lm, plan: list, max_tokens: int | None, question_weight: float, quiet: bool,
              results: list[ruler.RulerResult], layers: dict[int, float] | None = None) -> int:
    """passkey_run for the RULER-style plan; `max_tokens` None = each task's own."""
    def one(config, sample, on_chunk):
        return ruler.run_sample(lm.model, lm.tokenizer, config, sample, max_tokens, question_weight, on_chunk,
                                layers)

    return _run("ruler", plan, one, lambda s: s.task, quiet, results)


def _run(name: str, plan: list, one, where, quiet: bool, results: list) -> int:
    total = sum(sample.n_tokens * len(runs) for sample, runs in plan)
    done = 0
    with TokenProgress(name, total, quiet) as progress:
        for sample, runs in plan:
            for config in runs:
                label = f"{policy_name(config)} {report.tokens_label(sample.length)} {where(sample)}"
                base = done + len(sample.prefix_ids)

                def on_chunk(k: int, base=base, label=label) -> None:
                    progress.update(base + k, total, label)

                results.append(one(config, sample, on_chunk))
                done += sample.n_tokens
    return done


def retention_fit(configs: list[CacheConfig], gaps: list[int], sample: rt.RetentionSample,
                  max_positions: int) -> tuple[dict[str, list[int]], list[dict]]:
    """The gaps each policy runs (full stops where the model's positions run out) and the skipped ones."""
    fitted, skipped = {}, []
    for config in configs:
        fitted[config.policy] = [g for g in gaps if config.policy != "full" or sample.positions(g) <= max_positions]
        for g in gaps:
            if g not in fitted[config.policy]:
                skipped.append({"policy": config.policy, "gap": g, "reason": (
                    f"needs {sample.positions(g):,} positions, the model has {max_positions:,}")})
    return fitted, skipped


def retention_run(lm, configs: list[CacheConfig], sample_list: list, fitted: dict[str, list[int]],
                  segment_tokens: int, quiet: bool, runs: list[rt.RetentionRun]) -> int:
    """One pass per sample and policy with progress on stderr, appending to `runs` (the caller's, so an
    interrupted run keeps what it measured); returns the tokens read."""
    def cost(policy: str) -> int:
        g = fitted[policy]
        return 0 if not g else rt.LEAD + segment_tokens * (1 + len(g)) + g[-1]

    total = sum(cost(c.policy) for c in configs) * len(sample_list)
    done = 0
    with TokenProgress("retention", total, quiet) as progress:
        for sample in sample_list:
            for config in configs:
                if not fitted[config.policy]:
                    continue

                def on_tokens(k: int, label=f"{config.policy} sample {sample.sample + 1}") -> None:
                    nonlocal done
                    done += k
                    progress.update(done, total, label)

                runs.append(rt.run_sample(lm.model, config, sample, fitted[config.policy], on_tokens))
    return done

