from agent.worker.main import main

raise SystemExit(main())
