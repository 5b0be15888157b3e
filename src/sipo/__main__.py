from sipo.cli import main

raise SystemExit(main())
