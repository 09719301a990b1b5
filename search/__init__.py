"""Search core: step format, MCTS, the code sandbox and the answer grader. Pure Python, no Prefect."""
