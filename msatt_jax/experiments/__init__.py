"""Experiments that answer the paper's questions with the project's own commands.

`table1`: the paper's Table I (MSConvLSTM-Att against U-Net, Attention U-Net and FCN) and the
ablations of MSConvLSTM-Att, trained, evaluated and compared with paired statistics in one
resumable command. Its parts: `planning` (the runs), `records` (what a rerun is checked
against), `runner` (prepare, train, evaluate), `outputs` (tables, figures, model counts),
`report` (the tables' numbers), `stats` and `figures`.
"""
