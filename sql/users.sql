-- Active users as Customer.io people, identified by email.
-- kind: person
-- identifier: email
-- key: email
select
    email,
    first_name,
    last_name,
    plan,
    lifetime_value,
    is_admin,
    created_at,
    preferences
from demo.users
where deleted_at is null
