from xen_remus.migrate_hook import main

raise SystemExit(main())
