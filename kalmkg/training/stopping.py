"""Early stopping as an object, as PyKEEN's stoppers: validate, keep the best model, count patience.

The stopper knows no model and no metric code: the loop hands it `validate` (the filtered ranking
of evaluation.ranking) and `keep_best` (save the adapter). Its memory (best MRR and step,
validations without improvement, the history) lives in the run's TrainState, so a checkpoint
carries it and a resumed run stops where a straight run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kalmkg.training.distributed import World, agree


@dataclass
class EarlyStopper:
    validate: Callable[[], dict]  # the model's validation metrics now: mrr, hits@1, hits@10, count
    keep_best: Callable[[], None]  # save the model as the run's result
    log: Callable[[dict], None]  # record one validation ({"step", "epoch", "seconds", "valid"}), e.g. in metrics.jsonl
    say: Callable[[str], None]  # one line for the person watching
    patience: int  # validations without improvement before stopping; 0: never stop early
    world: World = World()

    def should_stop(self, state: Any) -> bool:
        """Validate now (every process takes part: each encodes its share) and update `state` (a
        TrainState); True on every process when patience ran out (the main process decides)."""
        metrics = self.validate()
        if not self.world.main:
            return agree(False, self.world)
        return agree(self._record(state, metrics), self.world)

    def _record(self, state: Any, metrics: dict) -> bool:
        record = {"step": state.step, "epoch": state.epoch, "seconds": round(getattr(state, "seconds", 0.0), 1),
                  "valid": metrics}
        state.history.append(record)
        self.log(record)
        self.say(f"step {state.step}: valid MRR {metrics['mrr']:.4f}  Hits@1 {metrics['hits@1']:.4f}  "
                 f"Hits@10 {metrics['hits@10']:.4f}  (n={metrics['count']})")
        if metrics["mrr"] > state.best_metric:
            state.best_metric, state.best_step = metrics["mrr"], state.step
            state.evals_without_improvement = 0
            self.keep_best()
            return False
        state.evals_without_improvement += 1
        return self.patience > 0 and state.evals_without_improvement >= self.patience
