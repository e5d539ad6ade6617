-- Which user belongs to which company, with their role there.
-- kind: relationship
-- person_identifier: email
-- person_key: email
-- object_type_id: 1
-- object_key: company_id
select
    u.email,
    m.company_id,
    m.role
from demo.memberships as m
join demo.users as u on u.user_id = m.user_id
where u.deleted_at is null
