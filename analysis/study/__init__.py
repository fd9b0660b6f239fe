"""What a whole study found, read from its runs' files: the seeds pooled (``pooled``), each seed's findings in
sentences (``findings``), the subnetworks across seeds (``mask_stability``), the paper's comparisons under each
attribution method (``method_comparison``), the planted sweep's detection limit (``detection_limit``), the
summary and the front page (``summary``, ``front_page``). A run's own analysis lives one floor down, in
``analysis/``; nothing there imports from here."""
