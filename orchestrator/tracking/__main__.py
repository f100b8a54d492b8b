"""`python -m orchestrator.tracking replay RUN_DIR`: send what a run buffered while MLflow was unreachable."""
from orchestrator.tracking.tracker import main

raise SystemExit(main())
