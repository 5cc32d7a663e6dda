from bridgecore.cli import main

raise SystemExit(main())
