"""Reports over run folders: one query for runs (`runs`), tables per task family (`tables`), plots (`plots`),
and the table a Hydra sweep writes when it ends (`sweep`)."""
