"""instructrl: RLHF end to end (SFT → reward model → PPO-ptx / policy gradient)."""
__version__ = "0.1.0"
