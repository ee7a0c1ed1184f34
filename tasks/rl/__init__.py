"""RL from a reward: PPO, RLOO and REINFORCE with a baseline, as one resumable DeepSpeed stage (`rl`)."""

from tasks.rl.config import RLConfig
from tasks.rl.stage import RLStage

__all__ = ["RLConfig", "RLStage"]
