-- Completed orders as order_completed events of their buyer: each order is sent once.
-- kind: event
-- identifier: email
-- key: email
-- event_key: order_id
-- name: order_completed
-- timestamp: completed_at
select
    o.order_id,
    u.email,
    o.completed_at,
    o.total,
    o.currency
from demo.orders as o
join demo.users as u on u.user_id = o.user_id
where u.deleted_at is null
