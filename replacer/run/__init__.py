"""One recipe run, in the order it happens: the flow the command line drives.

- `inputs`, `components`, `selection`: the preflight (model, data, plugins, sites) before any work;
- `layout`: the run directory, the only module that spells its paths and the students' names;
- `stages`: the stages as objects over one `RunContext` (teacher training in `teacher`, the attention
  statistics in `teacher_attention`, the sparse teacher in `sparse_teacher`, distillation, tuning,
  the pruned family in `prune_stage`, evaluation, export), run in order by `runner`;
- `saved_source`, `evaluate_saved`: reading a finished run (or a saved model) back, for
  `replacer export` and `replacer evaluate`.

Nothing here is imported by the library below it (graph, mixers, distillation, pruning, metrics,
training); this package only composes them. It keeps no imports itself, so `replacer.run.layout` can
be read by the report without loading the stages.
"""
