"""gtacore: the Guess-Think-Answer method: prompts, rollouts, rewards, losses, training."""
