"""Programs an operator runs next to Flower's: ``fedsq-superexec``, a warm SuperExec for ClientApps
(``superexec``: the loop; ``warm_executor``: the fork-per-task executor). They know the app only by the
reference in its FAB, never by import."""
