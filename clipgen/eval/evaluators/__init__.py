"""clipgen's evaluators, one module each: `config.evals.<name>.type` names the module, whose
`Evaluator` class clipgen.eval.registry builds."""
