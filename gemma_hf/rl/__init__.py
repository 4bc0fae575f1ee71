"""Reinforcement learning from feedback for Gemma: rewards (reward-model run directories and Python
functions, gemma_hf.rl.rewards; rule-based ones in gemma_hf.rl.rules), held-out policy measurements
(reward, KL to the initial policy, length: gemma_hf.rl.metrics), and the EMA anchor of WARP
(gemma_hf.rl.anchor). The methods are gemma_hf.recipes.rlhf and gemma_hf.recipes.warp."""
