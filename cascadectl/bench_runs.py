"""Running `cascadectl bench` grids: plan the passkey samples, fit the retention gaps, run them with progress.

Separate from the command modules (which turn options into settings and results into output) so that the
execution of each benchmark reads on its own, as cascadectl.bench_report does for their rendering. Progress goes
to stderr; results are appended to the caller's list, so a run interrupted by Ctrl-C keeps what it measured."""
from __future__ import annotations

from engine.bench import passkey as pk
from engine.bench import retention as rt
from engine.config import CacheConfig

from . import bench_report as report
from .console import Say, TokenProgress


def passkey_plan(lm, source, configs: list[CacheConfig], points, seed: int, max_tokens: int,
                 question_weight: float) -> tuple[list, list[dict]]:
    """Build and check a sample per grid point (length, depth, sample, prompt) before any model work: returns
    [(sample, the configs that run it)] and the skipped runs.

    Full attention is skipped (once per length) where the prompt and answer need more positions than the model
    has; each distinct warning about a sample is shown once."""
    plan, skipped, warned = [], [], set()
    for n, d, s, q in points:
        sample = pk.make_sample(lm.tokenizer, source, n, d, s, q, seed)
        runs = []
        for config in configs:
            if config.policy == "full" and not pk.fits_full(sample, max_tokens, lm.max_positions):
                if not any(k["length"] == n for k in skipped):
                    skipped.append({"policy": "full", "length": n, "reason": (
                        f"needs {sample.n_tokens + max_tokens:,} positions, the model has {lm.max_positions:,}")})
                continue
            warning = pk.check_sample(config, sample, lm.max_positions, max_tokens,
                                      pk.is_guided(config, sample, question_weight))
            if warning and warning not in warned:
                warned.add(warning)
                Say.warn(warning)
            runs.append(config)
        plan.append((sample, runs))
    return plan, skipped


def passkey_run(lm, plan: list, max_tokens: int, question_weight: float, quiet: bool,
                results: list[pk.PasskeyResult]) -> int:
    """Run the plan with progress on stderr, appending to `results` (the caller's, so an interrupted run keeps
    what it measured); returns the tokens read."""
    total = sum(sample.n_tokens * len(runs) for sample, runs in plan)
    done = 0
    with TokenProgress("passkey", total, quiet) as progress:
        for sample, runs in plan:
            for config in runs:
                label = f"{config.policy} {report.tokens_label(sample.length)} depth {sample.depth:g}"
                base = done + len(sample.prefix_ids)

                def on_chunk(k: int, base=base, label=label) -> None:
                    progress.update(base + k, total, label)

                results.append(pk.run_sample(lm.model, lm.tokenizer, config, sample, max_tokens,
                                             question_weight, on_chunk))
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

