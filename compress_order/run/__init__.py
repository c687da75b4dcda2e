"""One run: the plan, the stage trie, node identity and the node store, the pipeline that applies a stage and evaluates a node, tidy rows."""
