"""Alignment: SFT, reward modelling, PPO and DPO with LoRA-family adapters (issues 3 and 5)."""
