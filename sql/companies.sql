-- Companies as Customer.io objects of the first object type ("Companies").
-- kind: object
-- key: company_id
-- object_type_id: 1
select
    company_id,
    name,
    plan,
    seats,
    founded_on
from demo.companies
